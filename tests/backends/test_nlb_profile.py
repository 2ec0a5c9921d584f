"""The AWS NLB CID profile on the backend side: server ID from the environment, 16-byte 0x0F CIDs (issue 11)."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backends.cli import main as backend_main
from backends.client import EchoClient
from backends.settings import (
    AWS_SERVER_ID_ENV,
    parse_server_id_option,
    server_id_from_environment,
    settings_from_config,
)
from lb.control.config import load_config
from lb.control.keys import generate_key, write_key_file
from lb.core.cid_config import CidConfig
from lb.core.cid_decoder import decode_server_id
from lb.errors import ConfigError
from quiclb_harness.loopback_stack import loopback_stack

#: NLB's QUIC-LB profile: plaintext, 8-byte server ID, 16-byte CIDs whose first octet is 0x0F.
NLB_PROFILE = CidConfig(config_id=0, server_id_len=8, nonce_len=7, key=None, self_encode_length=True)
SID = bytes.fromhex("0123456789abcdef")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0x0123456789abcdef", SID),  # the NLB API's form
        ("0X0123456789ABCDEF", SID),
        (base64.b64encode(SID).decode(), SID),  # the controller's form
        ("  " + base64.b64encode(SID).decode() + "\n", SID),
        ("AAAAAAAAAAE=", bytes(7) + b"\x01"),
    ],
)
def test_server_id_from_the_environment(value: str, expected: bytes) -> None:
    assert server_id_from_environment({AWS_SERVER_ID_ENV: value}) == expected


@pytest.mark.parametrize("value", ["", "0x", "0xzz", "0x123", "not base64!", "AAAA=AAA", "0x0123 4567"])
def test_a_malformed_environment_server_id_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match=AWS_SERVER_ID_ENV):
        server_id_from_environment({AWS_SERVER_ID_ENV: value})


def test_no_environment_server_id() -> None:
    assert server_id_from_environment({}) is None
    assert parse_server_id_option("0001") == b"\x00\x01"
    assert parse_server_id_option("0x0001") == b"\x00\x01"
    with pytest.raises(ConfigError, match="--server-id"):
        parse_server_id_option("xyz")


def test_without_server_id_nor_environment_the_cli_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    monkeypatch.delenv(AWS_SERVER_ID_ENV, raising=False)
    assert backend_main(["-c", str(tmp_path / "absent.toml")]) == 2
    assert AWS_SERVER_ID_ENV in capsys.readouterr().err
    monkeypatch.setenv(AWS_SERVER_ID_ENV, "0xnothex")
    assert backend_main(["-c", str(tmp_path / "absent.toml")]) == 2
    assert "neither base64 nor 0x" in capsys.readouterr().err


def test_every_cid_a_backend_issues_in_the_profile_is_16_bytes_0x0f_and_carries_the_id(
    arun: Callable[..., Any],
) -> None:
    async def scenario() -> list[bytes]:
        cids: list[bytes] = []
        async with loopback_stack([SID], cid_configs=[NLB_PROFILE]) as stack:
            for _ in range(5):
                async with EchoClient.connect(*stack.vip, cadata=stack.cadata) as client:
                    assert await client.echo(b"nlb") == b"nlb"
                    await client.ping()
                    # Plaintext CIDs are linkable, so the backend issues only the handshake SCID (-21 §9);
                    # any NEW_CONNECTION_ID would be recorded here too.
                    cids.extend(client.wire.server_cids.values())
        return cids

    cids = arun(scenario())
    assert len(cids) >= 5 and len(set(cids)) == len(cids)
    for cid in cids:
        assert len(cid) == 16, cid.hex()
        assert cid[0] == 0x0F, cid.hex()  # config rotation 0b000, length 15 self-encoded
        assert cid[1:9] == SID, cid.hex()  # plaintext: the server ID in clear, as NLB reads it
        assert decode_server_id(NLB_PROFILE, cid) == SID


EXAMPLE = Path(__file__).parents[2] / "examples" / "nlb-profile.toml"


def test_the_example_configuration_uses_the_profile_on_both_sides(tmp_path: Path) -> None:
    config_path = tmp_path / EXAMPLE.name
    shutil.copy(EXAMPLE, config_path)
    write_key_file(tmp_path / "admin.token")
    write_key_file(tmp_path / "fallback.key", generate_key())
    config = load_config(config_path)
    (newest,) = config.service(None).cid_configs
    assert (newest.config_id, newest.server_id_len, newest.nonce_len) == (0, 8, 7)
    assert newest.key is None and newest.self_encode_length and newest.cid_len == 16
    # The LB side decodes it; the backend side selects its entry from the environment alone.
    for value in ("AAAAAAAAAKE=", "0x00000000000000a2"):
        server_id = server_id_from_environment({AWS_SERVER_ID_ENV: value})
        assert server_id is not None
        settings = settings_from_config(config, server_id)
        assert settings.cid_len == 16 and settings.newest_cid_config == newest
