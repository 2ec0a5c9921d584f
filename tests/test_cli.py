"""The `quiclb` command line: codec, keygen, check-config, exit codes and error messages."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lb.cli import main
from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec

WORKED_KEY = "fdf726a9893ec05c0632d3956680baf0"


def quiclb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lb", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_cid_encode_and_decode_from_flags_reproduce_the_worked_example(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--config-id", "0", "--server-id-len", "3", "--nonce-len", "4", "--key", WORKED_KEY]
    assert main(["cid", "encode", *flags, "--server-id", "31441a", "--nonce", "9c69c275"]) == 0
    assert capsys.readouterr().out.strip() == "0767947d29be054a"
    assert main(["cid", "decode", *flags, "0767947d29be054a"]) == 0
    out = capsys.readouterr().out
    assert "server_id   31441a" in out and "nonce       9c69c275" in out


def test_cid_decode_with_a_config_file_names_the_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dep = Deployment(tmp_path, [ServiceSpec(backends=[BackendSpec("0001", port=5001), BackendSpec("0002", port=5002)])],
                     admin=False)
    dep.write()
    assert main(["cid", "encode", "-c", str(dep.path), "--server-id", "0002"]) == 0
    cid = capsys.readouterr().out.strip()
    assert len(bytes.fromhex(cid)) == 17
    assert main(["cid", "decode", "-c", str(dep.path), cid]) == 0
    assert "backend     127.0.0.1:5002 (active)" in capsys.readouterr().out
    # A CID for an unassigned server ID, and a 0b111 CID: unroutable, exit 1.
    assert main(["cid", "encode", "-c", str(dep.path), "--server-id", "0777"]) == 0
    stray = capsys.readouterr().out.strip()
    assert main(["cid", "decode", "-c", str(dep.path), stray]) == 1
    assert "not assigned" in capsys.readouterr().out
    assert main(["cid", "decode", "-c", str(dep.path), "e7" + "00" * 7]) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cid", "encode", "--config-id", "0", "--server-id", "01"], "give -c FILE, or all of"),
        (["cid", "encode", "--config-id", "7", "--server-id-len", "3", "--nonce-len", "4", "--plaintext",
          "--server-id", "010203"], "config_id: must be 0..6, got 7"),
        (["cid", "encode", "--config-id", "0", "--server-id-len", "3", "--nonce-len", "4", "--key", "00",
          "--server-id", "010203"], "key: must be exactly 16 bytes"),
        (["cid", "encode", "--config-id", "0", "--server-id-len", "3", "--nonce-len", "4", "--plaintext",
          "--server-id", "zz"], "--server-id: not valid hex"),
        (["cid", "encode", "--config-id", "0", "--server-id-len", "3", "--nonce-len", "4", "--plaintext",
          "--server-id", "01"], "server_id: must be 3 bytes"),
        (["cid", "encode", "--config-id", "0", "--server-id-len", "3", "--nonce-len", "4", "--plaintext",
          "--key", WORKED_KEY, "--server-id", "010203"], "exactly one of --key, --key-file, --plaintext"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_keygen_writes_a_0600_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    assert main(["keygen", "-o", str(path)]) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = bytes.fromhex(path.read_text().strip())
    assert len(key) == 16
    assert main(["keygen", "-o", str(path)]) == 2  # exists: refused
    assert bytes.fromhex(path.read_text().strip()) == key
    assert main(["keygen", "-o", str(path), "--force"]) == 0
    assert bytes.fromhex(path.read_text().strip()) != key


def test_keygen_prints_distinct_keys() -> None:
    a, b = quiclb("keygen").stdout.strip(), quiclb("keygen").stdout.strip()
    assert len(bytes.fromhex(a)) == 16 and a != b


def test_check_config_reports_ok_and_names_the_bad_key(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, [ServiceSpec(backends=[BackendSpec("0001")])], admin=False)
    dep.write()
    ok = quiclb("check-config", "-c", str(dep.path))
    assert ok.returncode == 0 and "OK" in ok.stdout and "single-pass" in ok.stdout
    dep.path.write_text(dep.path.read_text().replace("nonce_len = 14", "nonce_len = 18"))
    bad = quiclb("check-config", "-c", str(dep.path))
    assert bad.returncode == 2
    assert "service[0].cid_config[0]" in bad.stderr and "19" in bad.stderr
    assert "Traceback" not in bad.stderr
