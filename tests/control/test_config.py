"""Configuration loading and validation (design.md §5; acceptance F-5, S-3, design implication 5)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.control.config import (
    BackendState,
    LbConfig,
    ReturnMode,
    UnroutableShortHeader,
    derive_fallback_key,
    load_config,
    parse_address,
    parse_config,
)
from lb.control.keys import write_key_file
from lb.core.cid_config import CidMode
from lb.core.maglev import is_prime
from lb.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "lb.toml"

Doc = dict[str, Any]


class Env:
    """A directory holding key, token and TLS files, plus a valid base document."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "lb.toml"
        self.keys: dict[str, bytes] = {}
        for name in ("echo-0", "echo-1", "web-0", "fallback"):
            self.keys[name] = write_key_file(root / "keys" / f"{name}.key")
        self.keys["bad"] = write_key_file(root / "keys" / "bad.key")
        (root / "keys" / "bad.key").chmod(0o644)
        short = root / "keys" / "short.key"
        short.write_text("00" * 15 + "\n")
        short.chmod(0o600)
        token = root / "admin.token"
        token.write_text("test-token-0123456789\n")
        token.chmod(0o600)
        loose = root / "loose.token"
        loose.write_text("test-token-0123456789\n")
        loose.chmod(0o644)
        (root / "tls").mkdir()
        (root / "tls" / "cert.pem").write_text("cert")
        (root / "tls" / "key.pem").write_text("key")

    def base(self) -> Doc:
        return {
            "lb": {
                "inside": "127.0.0.1:4434",
                "return_mode": "via-lb",
                "admin": "127.0.0.1:9100",
                "admin_token_file": "admin.token",
                "unroutable_short_header": "drop",
            },
            "service": [
                {
                    "name": "echo",
                    "vip": "127.0.0.1:4433",
                    "cid_config": [
                        {
                            "config_id": 0,
                            "server_id_len": 2,
                            "nonce_len": 14,
                            "key_file": "keys/echo-0.key",
                            "self_encode_length": True,
                        }
                    ],
                    "backend": [
                        {"server_id": f"000{i}", "address": f"127.0.0.1:500{i}", "state": "active"} for i in (1, 2, 3)
                    ],
                }
            ],
        }

    def parse(self, doc: Doc) -> LbConfig:
        return parse_config(doc, self.path)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def _svc(doc: Doc, i: int = 0) -> Doc:
    return doc["service"][i]  # type: ignore[no-any-return]


def _cfg(doc: Doc, i: int = 0) -> Doc:
    return _svc(doc)["cid_config"][i]  # type: ignore[no-any-return]


def _be(doc: Doc, i: int = 0) -> Doc:
    return _svc(doc)["backend"][i]  # type: ignore[no-any-return]


def _second_config(doc: Doc, **fields: Any) -> None:
    config = {"config_id": 1, "server_id_len": 2, "nonce_len": 14, "key_file": "keys/echo-1.key"}
    config.update(fields)
    _svc(doc)["cid_config"].append(config)


def _second_service(doc: Doc, **fields: Any) -> None:
    service = copy.deepcopy(_svc(doc))
    service.update(name="web", vip="127.0.0.1:8443")
    service["cid_config"][0]["key_file"] = "keys/web-0.key"
    for index, backend in enumerate(service.get("backend", [])):  # a backend serves one service
        backend["address"] = f"127.0.0.1:{6001 + index}"
    service.update(fields)
    doc["service"].append(service)


Mutation = Callable[[Doc], object]


def _set(where: Callable[[Doc], Doc], key: str, value: Any) -> Mutation:
    def mutate(doc: Doc) -> None:
        where(doc)[key] = value

    return mutate


def _del(where: Callable[[Doc], Doc], key: str) -> Mutation:
    def mutate(doc: Doc) -> None:
        del where(doc)[key]

    return mutate


def _lb(doc: Doc) -> Doc:
    return doc["lb"]  # type: ignore[no-any-return]


def _top(doc: Doc) -> Doc:
    return doc


S0 = "service[0]"
C0 = "service[0].cid_config[0]"
C1 = "service[0].cid_config[1]"

# (id, mutation, key path, fragment of the problem)
BAD_CASES: list[tuple[str, Mutation, str, str]] = [
    # F-5: key length, sid + nonce > 19, duplicate IDs, config 7, M not prime.
    ("key-15-bytes", _set(_cfg, "key_file", "keys/short.key"), f"{C0}.key_file", "32 hex digits"),
    ("key-world-readable", _set(_cfg, "key_file", "keys/bad.key"), f"{C0}.key_file", "chmod 600"),
    ("key-missing", _set(_cfg, "key_file", "keys/nope.key"), f"{C0}.key_file", "cannot read key file"),
    ("sid-plus-nonce-20", _set(_cfg, "nonce_len", 18), f"{C0}.server_id_len + nonce_len", "at most 19"),
    ("nonce-3", lambda d: _second_config(d, nonce_len=3), f"{C1}.nonce_len", "must be 4..18, got 3"),
    ("sid-0", _set(_cfg, "server_id_len", 0), f"{C0}.server_id_len", "must be 1..15"),
    ("dup-config-id", lambda d: _second_config(d, config_id=0), f"{C1}.config_id", "duplicate config_id 0"),
    ("config-id-7", _set(_cfg, "config_id", 7), f"{C0}.config_id", "0b111"),
    ("config-id-8", _set(_cfg, "config_id", 8), f"{C0}.config_id", "must be 0..6"),
    ("config-id-str", _set(_cfg, "config_id", "0"), f"{C0}.config_id", "must be an integer"),
    ("maglev-not-prime", _set(_lb, "maglev_size", 65536), "lb.maglev_size", "prime"),
    ("maglev-too-small", _set(_lb, "maglev_size", 293), "lb.maglev_size", "at least 100 x"),
    ("maglev-too-big", _set(_lb, "maglev_size", 16777259), "lb.maglev_size", "101..262139"),
    # Issue 12 item 5: a prime over the bound is refused with the reason (build time), not just the number.
    ("maglev-over-bound", _set(_lb, "maglev_size", 1048573), "lb.maglev_size", "builds in pure Python"),
    ("maglev-float", _set(_lb, "maglev_size", 65537.0), "lb.maglev_size", "must be an integer"),
    (
        "dup-server-id",
        _set(lambda d: _be(d, 1), "server_id", "0001"),
        f"{S0}.backend[1].server_id",
        "duplicate server_id 0001",
    ),
    # cid_config rules
    ("too-many-configs", lambda d: _svc(d)["cid_config"].extend([_cfg(d)] * 7), f"{S0}.cid_config", "1..7"),
    ("no-configs", _set(_svc, "cid_config", []), f"{S0}.cid_config", "1..7"),
    ("configs-not-array", _set(_svc, "cid_config", {"config_id": 0}), f"{S0}.cid_config", "[[service.cid_config]]"),
    ("neither-key-nor-plaintext", _del(_cfg, "key_file"), f"{C0}.key_file", "plaintext = true"),
    (
        "plaintext-false-no-key",
        lambda d: (_cfg(d).pop("key_file"), _cfg(d).update(plaintext=False)),
        f"{C0}.key_file",
        "add key_file",
    ),
    ("key-and-plaintext", _set(_cfg, "plaintext", True), f"{C0}.plaintext", "not both"),
    ("plaintext-not-bool", _set(_cfg, "plaintext", "yes"), f"{C0}.plaintext", "boolean"),
    ("self-encode-not-bool", _set(_cfg, "self_encode_length", 1), f"{C0}.self_encode_length", "bool"),
    (
        "sid-len-differs",
        lambda d: _second_config(d, server_id_len=3, nonce_len=13),
        f"{C1}.server_id_len",
        "one server ID",
    ),
    (
        "key-reused-in-service",
        lambda d: _second_config(d, key_file="keys/echo-0.key"),
        f"{C1}.key_file",
        f"same key as {C0}.key_file",
    ),
    (
        "key-reused-across-services",
        lambda d: _second_service(d, cid_config=[dict(_cfg(d))]),
        "service[1].cid_config[0].key_file",
        "same key as",
    ),
    (
        "fallback-key-is-cid-key",
        _set(_lb, "fallback_key_file", "keys/echo-0.key"),
        f"{C0}.key_file",
        "same key as lb.fallback_key_file",
    ),
    ("fallback-key-loose", _set(_lb, "fallback_key_file", "keys/bad.key"), "lb.fallback_key_file", "chmod 600"),
    # backends
    ("sid-too-long", _set(_be, "server_id", "000001"), f"{S0}.backend[0].server_id", "every cid_config"),
    ("sid-too-short", _set(_be, "server_id", "01"), f"{S0}.backend[0].server_id", "must be 2 bytes"),
    ("sid-not-hex", _set(_be, "server_id", "zz01"), f"{S0}.backend[0].server_id", "hex digits"),
    ("sid-odd", _set(_be, "server_id", "001"), f"{S0}.backend[0].server_id", "even number"),
    ("sid-spaces", _set(_be, "server_id", "00 01"), f"{S0}.backend[0].server_id", "hex digits"),
    ("sid-int", _set(_be, "server_id", 1), f"{S0}.backend[0].server_id", "must be a string"),
    (
        "dup-backend-address",
        _set(lambda d: _be(d, 2), "address", "127.0.0.1:5001"),
        f"{S0}.backend[2].address",
        "duplicate address 127.0.0.1:5001",
    ),
    ("backend-is-inside", _set(_be, "address", "127.0.0.1:4434"), f"{S0}.backend[0].address", "lb.inside"),
    ("backend-family-differs-from-inside", _set(_be, "address", "[::1]:5001"), f"{S0}.backend[0].address",
     "same family"),
    ("backend-shared-by-services",
     lambda d: _second_service(d, backend=[{"server_id": "0001", "address": "127.0.0.1:5001"}]),
     "service[1].backend[0].address", "also a backend of service[0]"),
    ("backend-is-other-vip",
     lambda d: _second_service(d, backend=[{"server_id": "0001", "address": "127.0.0.1:4433"}]),
     "service[1].backend[0].address", "is service[0].vip"),
    ("inside-wildcard", _set(_lb, "inside", "0.0.0.0:4434"), "lb.inside", "wildcard"),
    ("inside-public", _set(_lb, "inside", "8.8.8.8:4434"), "lb.inside", "public address"),
    ("direct-with-ipv6-vip", lambda d: (_lb(d).update(return_mode="direct"), _svc(d).update(vip="[::1]:4433")),
     f"{S0}.vip", "IPv4 VIPs only"),
    ("backend-is-vip", _set(_be, "address", "127.0.0.1:4433"), f"{S0}.backend[0].address", "vip"),
    ("backend-state", _set(_be, "state", "down"), f"{S0}.backend[0].state", "'active' or 'draining'"),
    ("backend-missing-address", _del(_be, "address"), f"{S0}.backend[0].address", "required key"),
    ("backends-not-array", _set(_svc, "backend", {"server_id": "0001"}), f"{S0}.backend", "[[service.backend]]"),
    # services
    ("no-services", _del(_top, "service"), "service", "at least one"),
    ("empty-services", _set(_top, "service", []), "service", "at least one"),
    ("service-table", lambda d: d.update(service=d["service"][0]), "service", "[[service]]"),
    ("dup-service-name", lambda d: _second_service(d, name="echo"), "service[1].name", "duplicate service name"),
    ("dup-vip", lambda d: _second_service(d, vip="127.0.0.1:4433"), "service[1].vip", "collides"),
    ("wildcard-vip-overlap", lambda d: _second_service(d, vip="0.0.0.0:4433"), "service[1].vip", "collides"),
    ("vip-is-inside", _set(_svc, "vip", "127.0.0.1:4434"), f"{S0}.vip", "lb.inside"),
    ("bad-service-name", _set(_svc, "name", "echo service"), f"{S0}.name", "letters, digits"),
    ("service-missing-vip", _del(_svc, "vip"), f"{S0}.vip", "required key"),
    ("cert-without-key", _set(_svc, "certificate", "tls/cert.pem"), f"{S0}.private_key", "together"),
    ("key-without-cert", _set(_svc, "private_key", "tls/key.pem"), f"{S0}.certificate", "together"),
    (
        "cert-missing-file",
        lambda d: _svc(d).update(certificate="tls/nope.pem", private_key="tls/key.pem"),
        f"{S0}.certificate",
        "file not found",
    ),
    # addresses
    ("vip-hostname", _set(_svc, "vip", "localhost:4433"), f"{S0}.vip", "hostnames are not allowed"),
    ("vip-port-0", _set(_svc, "vip", "127.0.0.1:0"), f"{S0}.vip", "port must be 1..65535"),
    ("vip-port-big", _set(_svc, "vip", "127.0.0.1:65536"), f"{S0}.vip", "port must be 1..65535"),
    ("vip-port-sign", _set(_svc, "vip", "127.0.0.1:+443"), f"{S0}.vip", "decimal"),
    ("vip-no-port", _set(_svc, "vip", "127.0.0.1"), f"{S0}.vip", "IP:port"),
    ("vip-v6-no-brackets", _set(_svc, "vip", "::1:4433"), f"{S0}.vip", "brackets"),
    ("vip-v4-brackets", _set(_svc, "vip", "[127.0.0.1]:4433"), f"{S0}.vip", "only for IPv6"),
    ("vip-not-string", _set(_svc, "vip", 4433), f"{S0}.vip", "must be a string"),
    # Issue 12 item 9: addresses no socket here can bind (EINVAL at run time) are refused by check-config.
    ("vip-v4-mapped", _set(_svc, "vip", "[::ffff:127.0.0.1]:4433"), f"{S0}.vip", 'instead ("127.0.0.1:4433")'),
    ("vip-scoped", _set(_svc, "vip", "[fe80::1%eth0]:4433"), f"{S0}.vip", "interface scope (%eth0)"),
    ("vip-link-local", _set(_svc, "vip", "[fe80::1]:4433"), f"{S0}.vip", "link-local"),
    ("backend-v4-mapped", _set(_be, "address", "[::ffff:127.0.0.1]:5001"), f"{S0}.backend[0].address",
     "IPv4-mapped"),
    ("admin-scoped", _set(_lb, "admin", "[::1%lo]:9100"), "lb.admin", "interface scope"),
    ("inside-port-0", _set(_lb, "inside", "127.0.0.1:0"), "lb.inside", "port must be 1..65535"),
    # [lb]
    ("no-lb", _del(_top, "lb"), "lb", "required table [lb]"),
    ("lb-not-table", _set(_top, "lb", "x"), "lb", "must be a table"),
    ("no-inside", _del(_lb, "inside"), "lb.inside", "required key is missing"),
    ("return-mode", _set(_lb, "return_mode", "dsr"), "lb.return_mode", "'via-lb' or 'direct'"),
    (
        "unroutable",
        _set(_lb, "unroutable_short_header", "reject"),
        "lb.unroutable_short_header",
        "'drop' or 'fallback'",
    ),
    ("admin-without-token", _del(_lb, "admin_token_file"), "lb.admin_token_file", "required when lb.admin"),
    ("admin-any", _set(_lb, "admin", "0.0.0.0:9100"), "lb.admin", "admin_bind_any"),
    ("admin-public", _set(_lb, "admin", "10.1.2.3:9100"), "lb.admin", "not a loopback"),
    ("admin-any-v6", _set(_lb, "admin", "[::]:9100"), "lb.admin", "not a loopback"),
    ("admin-token-loose", _set(_lb, "admin_token_file", "loose.token"), "lb.admin_token_file", "chmod 600"),
    ("admin-token-missing", _set(_lb, "admin_token_file", "nope.token"), "lb.admin_token_file", "cannot read"),
    ("health-interval-0", _set(_lb, "health_interval", 0), "lb.health_interval", "must be 0.05..3600 seconds"),
    ("health-timeout-neg", _set(_lb, "health_timeout", -0.5), "lb.health_timeout", "must be 0.01..60 seconds"),
    # Issue 12 item 10: absurd but positive values are refused, naming the range.
    ("health-interval-tiny", _set(_lb, "health_interval", 1e-300), "lb.health_interval",
     "must be 0.05..3600 seconds, got 1e-300"),
    ("health-interval-huge", _set(_lb, "health_interval", 86400), "lb.health_interval", "0.05..3600"),
    ("health-timeout-huge", _set(_lb, "health_timeout", 1e308), "lb.health_timeout",
     "must be 0.01..60 seconds, got 1e+308"),
    ("health-timeout-over-interval", lambda d: _lb(d).update(health_interval=0.5, health_timeout=2),
     "lb.health_timeout", "must not exceed lb.health_interval (0.5)"),
    ("health-threshold-huge", _set(_lb, "health_threshold", 10**18), "lb.health_threshold",
     "must be 1..100, got 1000000000000000000"),
    ("health-interval-inf", _set(_lb, "health_interval", float("inf")), "lb.health_interval",
     "0.05..3600 seconds, got inf"),
    ("health-interval-nan", _set(_lb, "health_interval", float("nan")), "lb.health_interval",
     "0.05..3600 seconds, got nan"),
    ("health-interval-str", _set(_lb, "health_interval", "1s"), "lb.health_interval", "number of seconds"),
    ("health-threshold-0", _set(_lb, "health_threshold", 0), "lb.health_threshold", "must be 1..100"),
    ("health-threshold-bool", _set(_lb, "health_threshold", True), "lb.health_threshold", "integer"),
    ("versions-empty", _set(_lb, "supported_versions", []), "lb.supported_versions", "at least one"),
    ("versions-zero", _set(_lb, "supported_versions", [1, 0]), "lb.supported_versions[1]", "Version Negotiation"),
    ("versions-grease", _set(_lb, "supported_versions", [0x1A2A3A4A]), "lb.supported_versions[0]", "greasing"),
    ("versions-dup", _set(_lb, "supported_versions", [1, 1]), "lb.supported_versions[1]", "duplicate"),
    ("versions-str", _set(_lb, "supported_versions", ["1"]), "lb.supported_versions[0]", "integer"),
    ("versions-big", _set(_lb, "supported_versions", [1 << 32]), "lb.supported_versions[0]", "0xffffffff"),
    ("lb-sources-bad", _set(_lb, "lb_sources", ["lb2:4434"]), "lb.lb_sources[0]", "hostnames"),
    ("lb-sources-inside", _set(_lb, "lb_sources", ["127.0.0.1:4434"]), "lb.lb_sources[0]", "duplicate"),
    ("admin-bind-any-str", _set(_lb, "admin_bind_any", "yes"), "lb.admin_bind_any", "boolean"),
    ("version-negative", _set(_top, "version", -1), "version", "must be 0.."),
    ("version-str", _set(_top, "version", "1"), "version", "must be an integer"),
    # typo protection
    ("unknown-top", _set(_top, "servce", []), "servce", "unknown key 'servce' (did you mean 'service'?)"),
    ("unknown-lb", _set(_lb, "retrun_mode", "direct"), "lb.retrun_mode", "unknown key 'retrun_mode'"),
    ("unknown-service", _set(_svc, "vips", "x"), f"{S0}.vips", "unknown key 'vips'"),
    (
        "unknown-cid-config",
        _set(_cfg, "nonse_len", 4),
        f"{C0}.nonse_len",
        "unknown key 'nonse_len' (did you mean 'nonce_len'?)",
    ),
    ("unknown-backend", _set(_be, "weight", 2), f"{S0}.backend[0].weight", "unknown key 'weight'"),
    ("wrong-type-sid-len", _set(_cfg, "server_id_len", "2"), f"{C0}.server_id_len", "must be an integer"),
    ("missing-nonce-len", _del(_cfg, "nonce_len"), f"{C0}.nonce_len", "required key is missing"),
]


@pytest.mark.parametrize(("mutate", "key_path", "problem"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_config_rejected(env: Env, mutate: Mutation, key_path: str, problem: str) -> None:
    doc = env.base()
    mutate(doc)
    with pytest.raises(ConfigError) as info:
        env.parse(doc)
    message = str(info.value)
    assert message.startswith(f"{env.path}: {key_path}: "), message
    assert problem in message, message
    for key in env.keys.values():
        assert key.hex() not in message.lower()


def test_base_document_is_valid(env: Env) -> None:
    config = env.parse(env.base())
    service = config.service(None)
    assert service.name == "echo"
    assert service.vip == ("127.0.0.1", 4433)
    assert [b.server_id for b in service.backends] == [b"\x00\x01", b"\x00\x02", b"\x00\x03"]
    assert service.cid_configs[0].key == env.keys["echo-0"]
    assert not service.linkable
    assert config.lb.admin_token_file == env.root / "admin.token"
    assert config.version == 0


def test_example_config_loads(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "lb.toml")
    key = write_key_file(tmp_path / "keys" / "echo-0.key")
    write_key_file(tmp_path / "fallback.key")
    (tmp_path / "admin.token").write_text("t0ken-0123456789abcdef\n")
    (tmp_path / "admin.token").chmod(0o600)
    config = load_config(tmp_path / "lb.toml")
    assert config.lb.inside == ("127.0.0.1", 4434)
    assert config.lb.return_mode is ReturnMode.VIA_LB
    assert config.lb.admin == ("127.0.0.1", 9100)
    assert config.lb.unroutable_short_header is UnroutableShortHeader.DROP
    assert config.lb.maglev_size == 65537
    assert config.lb.supported_versions == (0x00000001, 0x6B3343CF)
    service = config.service("echo")
    assert service.certificate is None and service.private_key is None
    cid = service.newest_cid_config()
    assert (cid.config_id, cid.server_id_len, cid.nonce_len, cid.key) == (0, 2, 14, key)
    assert cid.mode is CidMode.SINGLE_PASS and cid.cid_len == 17
    assert [b.address for b in service.backends] == [("127.0.0.1", 5001 + i) for i in range(3)]
    assert all(b.state is BackendState.ACTIVE for b in service.backends)
    assert service.backend_by_server_id(b"\x00\x02") == service.backends[1]
    assert service.backend_by_server_id(b"\x00\x09") is None


def test_valid_variants(env: Env) -> None:
    doc = env.base()
    doc["version"] = 7
    lb = doc["lb"]
    lb.update(
        admin="[::]:0", admin_bind_any=True, return_mode="direct", unroutable_short_header="fallback",
        maglev_size=307, health_interval=1, health_timeout=0.25, health_threshold=1,
        supported_versions=[1], lb_sources=["[::1]:4434", "10.0.0.2:4434"], fallback_key_file="keys/fallback.key",
    )  # fmt: skip
    _second_service(doc, backend=[])
    _second_config(doc, config_id=6, nonce_len=5)
    _be(doc, 1)["state"] = "draining"
    _svc(doc).update(certificate="tls/cert.pem", private_key="tls/key.pem", vip="127.0.0.9:4433")
    config = env.parse(doc)
    assert config.version == 7
    assert config.lb.admin == ("::", 0)
    assert config.lb.return_mode is ReturnMode.DIRECT
    assert config.lb.health_interval == 1.0 and isinstance(config.lb.health_interval, float)
    assert config.lb.lb_sources == (("::1", 4434), ("10.0.0.2", 4434))
    echo = config.service("echo")
    assert echo.vip == ("127.0.0.9", 4433)
    assert echo.newest_cid_config().config_id == 6
    assert echo.newest_cid_config().mode is CidMode.FOUR_PASS
    assert echo.backends[1].state is BackendState.DRAINING
    assert echo.certificate == env.root / "tls" / "cert.pem"
    assert config.service("web").backends == ()
    with pytest.raises(ConfigError, match="name one"):
        config.service(None)
    with pytest.raises(ConfigError, match="no service named 'nope'"):
        config.service("nope")


def test_plaintext_is_linkable_and_public_fallback_key(env: Env) -> None:
    doc = env.base()
    del _cfg(doc)["key_file"]
    _cfg(doc)["plaintext"] = True
    service = env.parse(doc).service("echo")
    assert service.linkable
    assert service.cid_configs[0].key is None
    # No fallback_key_file: the documented, public key (set fallback_key_file instead).
    assert service.fallback_key == derive_fallback_key("echo", None)


def test_admin_absent_needs_no_token(env: Env) -> None:
    doc = env.base()
    del doc["lb"]["admin"]
    del doc["lb"]["admin_token_file"]
    assert env.parse(doc).lb.admin is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:4433", ("127.0.0.1", 4433)),
        ("[::1]:4433", ("::1", 4433)),
        ("[0:0::1]:1", ("::1", 1)),
        ("[2001:DB8::0:1]:65535", ("2001:db8::1", 65535)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text, "x") == expected


def test_parse_address_names_where() -> None:
    with pytest.raises(ConfigError, match=r"^lb\.toml: lb\.inside: .*hostnames"):
        parse_address("example.com:443", "lb.toml: lb.inside")
    assert parse_address("127.0.0.1:0", "x", allow_port_zero=True) == ("127.0.0.1", 0)


# --------------------------------------------------------------------------- TOML files


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_text('[lb]\ninside = "127.0.0.1:4434"\nreturn_mode = via-lb\n')
    with pytest.raises(ConfigError, match=r"lb\.toml: line 3, column \d+: TOML syntax error"):
        load_config(path)


def test_toml_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_bytes(b'[lb]\ninside = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration: No such file"):
        load_config(tmp_path / "absent.toml")


def test_unknown_key_in_toml_text(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "lb.toml")
    write_key_file(tmp_path / "keys" / "echo-0.key")
    write_key_file(tmp_path / "fallback.key")
    (tmp_path / "admin.token").write_text("t-0123456789abcdef\n")
    (tmp_path / "admin.token").chmod(0o600)
    text = (tmp_path / "lb.toml").read_text().replace("nonce_len = 14", "nonse_len = 14")
    (tmp_path / "lb.toml").write_text(text)
    with pytest.raises(ConfigError, match=r"service\[0\]\.cid_config\[0\]\.nonse_len: unknown key 'nonse_len'"):
        load_config(tmp_path / "lb.toml")


# --------------------------------------------------------------------------- identity and secrecy


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    root = tmp_path / "a"
    root.mkdir()
    shutil.copy(EXAMPLE, root / "lb.toml")
    write_key_file(root / "keys" / "echo-0.key")
    write_key_file(root / "fallback.key")
    (root / "admin.token").write_text("t0ken-0123456789abcdef\n")
    (root / "admin.token").chmod(0o600)
    return root


def _subprocess_load(path: Path, seed: str) -> list[str]:
    code = (
        "import sys; from lb.control.config import load_config; c = load_config(sys.argv[1]); "
        "print(c.digest); print(c.services[0].fallback_key.hex())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        env={**os.environ, "PYTHONHASHSEED": seed}, cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.split()


def test_digest_stable_across_loads_and_processes(example_dir: Path) -> None:
    first = load_config(example_dir / "lb.toml")
    second = load_config(example_dir / "lb.toml")
    assert first.digest == second.digest
    assert len(first.digest) == 64
    assert first == second
    expected = [first.digest, first.services[0].fallback_key.hex()]
    assert _subprocess_load(example_dir / "lb.toml", "1") == expected
    assert _subprocess_load(example_dir / "lb.toml", "4242") == expected


def test_digest_independent_of_file_location(example_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(example_dir, moved)
    assert load_config(moved / "lb.toml").digest == load_config(example_dir / "lb.toml").digest


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('address = "127.0.0.1:5003"', 'address = "127.0.0.1:5004"'),
        ('server_id = "0003"', 'server_id = "0004"'),
        ('state = "active"                   # "active"', 'state = "draining"                 # "active"'),
        ("# version = 1", "version = 1"),
        ("# maglev_size = 65537", "maglev_size = 65521"),
        ('unroutable_short_header = "drop"', 'unroutable_short_header = "fallback"'),
    ],
    ids=["backend-address", "backend-sid", "backend-state", "version", "maglev", "unroutable"],
)
def test_digest_changes_with_content(example_dir: Path, old: str, new: str) -> None:
    path = example_dir / "lb.toml"
    before = load_config(path).digest
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    assert load_config(path).digest != before


def test_digest_changes_with_key_and_ignores_comments(example_dir: Path) -> None:
    path = example_dir / "lb.toml"
    before = load_config(path).digest
    path.write_text("# a comment\n" + path.read_text())
    assert load_config(path).digest == before
    write_key_file(example_dir / "keys" / "echo-0.key", overwrite=True)
    assert load_config(path).digest != before


def test_digest_ignores_backend_order(env: Env) -> None:
    doc = env.base()
    before = env.parse(doc).digest
    _svc(doc)["backend"].reverse()
    assert env.parse(doc).digest == before


def test_no_key_material_in_repr(env: Env) -> None:
    doc = env.base()
    doc["lb"]["fallback_key_file"] = "keys/fallback.key"
    _second_config(doc)
    config = env.parse(doc)
    text = repr(config) + str(config)
    secrets = [*env.keys.values(), *(s.fallback_key for s in config.services)]
    for secret in secrets:
        assert secret.hex() not in text
        assert repr(secret) not in text
    assert "fallback_key" not in repr(config.services[0])


def test_fallback_key_deterministic_and_per_service(env: Env) -> None:
    doc = env.base()
    _second_service(doc)
    a = env.parse(doc)
    b = env.parse(copy.deepcopy(doc))
    assert [s.fallback_key for s in a.services] == [s.fallback_key for s in b.services]
    echo, web = a.service("echo").fallback_key, a.service("web").fallback_key
    assert len(echo) == 32 and echo != web
    assert echo == derive_fallback_key("echo", None)  # public: from the name alone

    doc["lb"]["fallback_key_file"] = "keys/fallback.key"
    shared = env.parse(doc)
    echo2, web2 = shared.service("echo").fallback_key, shared.service("web").fallback_key
    assert echo2 != web2
    assert echo2 not in (echo, web)
    assert echo2 == derive_fallback_key("echo", env.keys["fallback"])
    assert shared.digest != a.digest


@pytest.mark.parametrize("key_file", [None, "keys/fallback.key"], ids=["derived", "key-file"])
def test_fallback_key_survives_cid_key_rotation(env: Env, key_file: str | None) -> None:
    # Issue 13 hole 2: each step of a rotation (add config 1, then remove config 0), a new key
    # for a config, and the configs' order leave the fallback key - hence the Maglev table - alone.
    def key_of(configs: list[Doc]) -> bytes:
        doc = env.base()
        if key_file is not None:
            doc["lb"]["fallback_key_file"] = key_file
        _svc(doc)["cid_config"] = configs
        return env.parse(doc).services[0].fallback_key

    old = {"config_id": 0, "server_id_len": 2, "nonce_len": 14, "key_file": "keys/echo-0.key"}
    new = {"config_id": 1, "server_id_len": 2, "nonce_len": 14, "key_file": "keys/echo-1.key"}
    rekeyed = {**old, "key_file": "keys/web-0.key"}
    plain = {"config_id": 2, "server_id_len": 2, "nonce_len": 14, "plaintext": True}
    before = key_of([old])
    assert {key_of(c) for c in ([old, new], [new, old], [new], [rekeyed], [plain], [old, plain])} == {before}


# --------------------------------------------------------------------------- robustness (F-3 in miniature)

_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=30),
    st.sampled_from(["127.0.0.1:1", "[::1]:2", "0001", "keys/echo-0.key", "via-lb", "drop"]),
    st.lists(st.integers(0, 2**33), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)  # fmt: skip


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_documents_raise_only_config_error(env: Env, data: st.DataObject) -> None:
    doc = env.base()
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(_LEAVES)
    try:
        env.parse(doc)
    except ConfigError as exc:
        assert str(exc).startswith(f"{env.path}: ")


def test_largest_allowed_maglev_table_builds_well_under_a_second() -> None:
    """Issue 12 item 5: the bound on maglev_size is what the pure-Python build can do quickly."""
    import time  # noqa: PLC0415

    from lb.control.config import MAX_MAGLEV_SIZE  # noqa: PLC0415
    from lb.core.maglev import build_maglev_table  # noqa: PLC0415

    size = next(n for n in range(MAX_MAGLEV_SIZE, 1, -1) if is_prime(n))
    names = [i.to_bytes(2, "big") for i in range(1, 101)]
    started = time.process_time()  # CPU time: other processes on the CI machine do not count
    build_maglev_table(names, b"k" * 32, size)
    assert time.process_time() - started < 1.0
