"""LbConfig.digest is derived from the dataclasses, so no field can silently stay out of it."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

from lb.control.config import LbConfig, LbSection, RetryMode, load_config
from lb.control.config_digest import canonical_form, config_digest, fingerprint

GOLDEN_TOML = """
version = 42

[lb]
inside = "10.1.0.1:4434"
return_mode = "via-lb"
admin = "127.0.0.1:9100"
admin_token_file = "admin.token"
unroutable_short_header = "fallback"
fallback_key_file = "keys/fallback.key"
maglev_size = 1009
health_interval = 1.5
health_timeout = 0.25
health_threshold = 4
supported_versions = [0x00000001]
lb_sources = ["10.1.0.2:4434", "[fd00::2]:4434"]
admin_bind_any = false

[[service]]
name = "web"
vip = "[2001:db8::10]:443"
certificate = "tls/cert.pem"
private_key = "tls/key.pem"

[[service.cid_config]]
config_id = 1
server_id_len = 3
nonce_len = 13
plaintext = true
self_encode_length = false

[[service.backend]]
server_id = "000002"
address = "10.1.0.12:5002"
state = "draining"

[[service.backend]]
server_id = "000001"
address = "10.1.0.11:5001"

[[service]]
name = "echo"
vip = "192.0.2.10:4433"

[[service.cid_config]]
config_id = 0
server_id_len = 2
nonce_len = 14
key_file = "keys/echo-0.key"

[[service.cid_config]]
config_id = 2
server_id_len = 2
nonce_len = 6
key_file = "keys/echo-2.key"

[[service.backend]]
server_id = "0001"
address = "10.1.0.21:6001"
"""
#: The digest of GOLDEN_TOML computed by the hand-written canonical dicts this module replaced
#: (commit 66644a4): deriving it from the dataclasses changed no digest.
GOLDEN_DIGEST = "6961cbd5f03f950c02a41249529471cd3cdf91a24cc9ec75762db04cf4c44d5e"


def write_golden(root: Path) -> Path:
    (root / "keys").mkdir(parents=True)
    (root / "tls").mkdir()
    for name, key in (("echo-0", "00" * 16), ("echo-2", "11" * 16), ("fallback", "22" * 16)):
        path = root / "keys" / f"{name}.key"
        path.write_text(key + "\n")
        path.chmod(0o600)
    token = root / "admin.token"
    token.write_text("tok-0123456789abcdef\n")
    token.chmod(0o600)
    (root / "tls" / "cert.pem").write_text("c")
    (root / "tls" / "key.pem").write_text("k")
    (root / "lb.toml").write_text(GOLDEN_TOML)
    return root / "lb.toml"


@pytest.fixture
def golden(tmp_path: Path) -> LbConfig:
    return load_config(write_golden(tmp_path / "golden"))


def test_digest_is_unchanged_by_deriving_it_from_the_dataclasses(golden: LbConfig) -> None:
    assert golden.digest == GOLDEN_DIGEST == config_digest(golden)


def test_digest_does_not_depend_on_where_the_files_live(golden: LbConfig, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(golden.path.parent, moved)
    assert load_config(moved / "lb.toml").digest == golden.digest


def _keys(form: dict[str, Any]) -> set[str]:
    return set(form)


def test_every_field_is_in_the_canonical_form_or_deliberately_left_out(golden: LbConfig) -> None:
    form = canonical_form(golden)
    omitted = {"path", "digest"}
    assert _keys(form) == {f.name for f in dataclasses.fields(LbConfig)} - omitted | {"format"}
    assert _keys(form["lb"]) == {f.name for f in dataclasses.fields(LbSection)}
    service = form["services"][0]
    later = {"retry", "retry_key", "retry_flood_threshold", "reset_key"}  # only when set (issue 9)
    assert _keys(service) == {f.name for f in dataclasses.fields(type(golden.services[0]))} - {"linkable"} - later
    assert _keys(service["backends"][0]) == {f.name for f in dataclasses.fields(type(golden.services[0].backends[0]))}
    assert _keys(service["cid_configs"][0]) == {
        f.name for f in dataclasses.fields(type(golden.services[0].cid_configs[0]))
    }


def test_later_fields_enter_the_digest_only_when_set(golden: LbConfig) -> None:
    svc = golden.services[0]
    changed = dataclasses.replace(svc, retry=RetryMode.FLOOD, retry_key=bytes(16), reset_key=bytes(range(16)))
    other = dataclasses.replace(golden, services=(changed, *golden.services[1:]))
    service = canonical_form(other)["services"]
    form = next(s for s in service if s["name"] == svc.name)
    assert form["retry"] == "flood" and form["retry_key"] != bytes(16).hex() and "reset_key" in form
    assert "retry_flood_threshold" not in form  # still at its default
    assert config_digest(other) != config_digest(golden)


def test_canonical_form_holds_fingerprints_not_keys_and_paths_relative(golden: LbConfig) -> None:
    form = canonical_form(golden)
    echo = next(s for s in form["services"] if s["name"] == "echo")
    assert echo["cid_configs"][0]["key"] == fingerprint(bytes(16))
    assert echo["fallback_key"] == fingerprint(golden.service("echo").fallback_key)
    assert form["lb"]["fallback_key_file"] is True
    assert form["lb"]["admin_token_file"] == "admin.token"
    web = next(s for s in form["services"] if s["name"] == "web")
    assert web["certificate"] == "tls/cert.pem"
    assert [b["server_id"] for b in web["backends"]] == ["000001", "000002"]  # sorted, not file order
    assert [s["name"] for s in form["services"]] == ["echo", "web"]
    assert "22" * 16 not in str(form) and "11" * 16 not in str(form)


@dataclasses.dataclass(frozen=True, slots=True)
class _LbSectionPlus(LbSection):
    new_knob: float = 2.5


@dataclasses.dataclass(frozen=True, slots=True)
class _LbSectionOdd(LbSection):
    new_thing: object = dataclasses.field(default_factory=object)


def _with_section(config: LbConfig, kind: type[LbSection]) -> LbConfig:
    values = {f.name: getattr(config.lb, f.name) for f in dataclasses.fields(LbSection)}
    return dataclasses.replace(config, lb=kind(**values))


def test_a_new_field_enters_the_digest_without_anyone_remembering_to_add_it(golden: LbConfig) -> None:
    plus = _with_section(golden, _LbSectionPlus)
    assert canonical_form(plus)["lb"]["new_knob"] == 2.5
    assert config_digest(plus) != golden.digest


def test_a_field_of_a_type_with_no_canonical_form_fails_loudly(golden: LbConfig) -> None:
    with pytest.raises(TypeError, match="no canonical form for object"):
        config_digest(_with_section(golden, _LbSectionOdd))
