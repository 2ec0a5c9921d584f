"""Validation of a parsed TOML document into an :class:`~lb.control.config_model.LbConfig`.

Every problem raises :class:`~lb.errors.ConfigError` as ``"<file>: <key path>: <problem>"``;
nothing is half-built. Use :func:`lb.control.config.load_config` rather than this module.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import math
from collections.abc import Collection, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from lb.control.config_model import (
    _FINGERPRINT_PERSON,
    _HEX,
    _SERVICE_NAME,
    DEFAULT_MAGLEV_SIZE,
    DEFAULT_SUPPORTED_VERSIONS,
    HEALTH_INTERVAL_RANGE,
    HEALTH_THRESHOLD_RANGE,
    HEALTH_TIMEOUT_RANGE,
    MAGLEV_SLOTS_PER_BACKEND,
    MAX_CID_CONFIGS,
    MAX_MAGLEV_SIZE,
    MIN_MAGLEV_SIZE,
    Address,
    BackendConfig,
    BackendState,
    LbConfig,
    LbSection,
    ReturnMode,
    ServiceConfig,
    UnroutableShortHeader,
    _type_name,
    derive_fallback_key,
    parse_address,
)
from lb.control.keys import read_key_file, read_token_file
from lb.core.addresses import format_address
from lb.core.cid_config import UNROUTABLE_CONFIG_ID, CidConfig
from lb.core.maglev import is_prime
from lb.errors import ConfigError

# --------------------------------------------------------------------------- validation

_T = TypeVar("_T")
_E = TypeVar("_E", bound=Enum)

_LB_KEYS = frozenset(
    {
        "inside", "return_mode", "admin", "admin_token_file", "unroutable_short_header",
        "fallback_key_file", "maglev_size", "health_interval", "health_timeout",
        "health_threshold", "supported_versions", "lb_sources", "admin_bind_any",
    }
)  # fmt: skip
_SERVICE_KEYS = frozenset({"name", "vip", "certificate", "private_key", "cid_config", "backend"})
_CID_CONFIG_KEYS = frozenset({"config_id", "server_id_len", "nonce_len", "key_file", "plaintext", "self_encode_length"})
_BACKEND_KEYS = frozenset({"server_id", "address", "state"})
_TOP_KEYS = frozenset({"lb", "service", "version"})


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _fingerprint(key: bytes) -> str:
    """A one-way, domain-separated fingerprint of key material for the digest."""
    return hashlib.blake2b(key, digest_size=16, person=_FINGERPRINT_PERSON).hexdigest()


def _conflicts(a: Address, b: Address) -> bool:
    """Two UDP bind addresses collide: same port and same IP, or either is a wildcard."""
    if a[1] != b[1]:
        return False
    if a[0] == b[0]:
        return True
    return ipaddress.ip_address(a[0]).is_unspecified or ipaddress.ip_address(b[0]).is_unspecified


def _family(address: Address) -> int:
    """4 or 6."""
    return ipaddress.ip_address(address[0]).version


def _is_greased_version(version: int) -> bool:
    """RFC 9000 §15: versions 0x?a?a?a?a are reserved to exercise negotiation."""
    return version & 0x0F0F0F0F == 0x0A0A0A0A


class Parser:
    """Walks the TOML document once; ``fail`` raises the first problem with file and key path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent
        # key fingerprint -> key path that first used it (S-3: one key per config and tenant)
        self.key_owners: dict[bytes, str] = {}

    # ---- primitives

    def fail(self, key_path: str, problem: str) -> NoReturn:
        raise ConfigError(f"{self.path}: {key_path}: {problem}")

    def table(
        self, value: object, where: str, allowed: frozenset[str], required: Collection[str] = ()
    ) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            self.fail(where, f"must be a table, got {_type_name(value)}")
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                self.fail(_join(where, str(key)), f"unknown key {key!r}{suggestion}")
        for key in required:
            if key not in value:
                self.fail(_join(where, key), "required key is missing")
        return value

    def typed(self, table: Mapping[str, Any], key: str, where: str, kind: type[_T], what: str) -> _T | None:
        if key not in table:
            return None
        value = table[key]
        # bool is an int subclass; TOML keeps them distinct, so do we.
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            self.fail(_join(where, key), f"must be {what}, got {_type_name(value)}")
        return value  # type: ignore[no-any-return]

    def string(self, table: Mapping[str, Any], key: str, where: str) -> str | None:
        return self.typed(table, key, where, str, "a string")

    def boolean(self, table: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        value = self.typed(table, key, where, bool, "a boolean (true or false)")
        return default if value is None else value

    def enum(self, table: Mapping[str, Any], key: str, where: str, kind: type[_E], default: _E) -> _E:
        value = self.string(table, key, where)
        if value is None:
            return default
        for member in kind:
            if member.value == value:
                return member
        choices = " or ".join(repr(m.value) for m in kind)
        self.fail(_join(where, key), f"must be {choices}, got {value!r}")

    def address(
        self, table: Mapping[str, Any], key: str, where: str, *, allow_port_zero: bool = False
    ) -> Address | None:
        if key not in table:
            return None
        return parse_address(table[key], f"{self.path}: {_join(where, key)}", allow_port_zero=allow_port_zero)

    def file_path(self, table: Mapping[str, Any], key: str, where: str) -> Path | None:
        value = self.string(table, key, where)
        if value is None:
            return None
        if not value or "\x00" in value:
            self.fail(_join(where, key), "must be a non-empty file path")
        return (self.base / value).absolute()

    def key_file(self, table: Mapping[str, Any], key: str, where: str) -> bytes | None:
        path = self.file_path(table, key, where)
        if path is None:
            return None
        key_path = _join(where, key)
        try:
            secret = read_key_file(path)
        except ConfigError as exc:
            self.fail(key_path, str(exc))
        first = self.key_owners.setdefault(secret, key_path)
        if first != key_path:
            self.fail(
                key_path,
                f"uses the same key as {first}; every configuration and service needs its own key "
                "(acceptance S-3); create one with `quiclb keygen`",
            )
        return secret

    # ---- sections

    def parse(self, data: object) -> LbConfig:
        top = self.table(data, "", _TOP_KEYS)
        if "lb" not in top:
            self.fail("lb", "required table [lb] is missing")
        version = self.typed(top, "version", "", int, "an integer")
        if version is None:
            version = 0
        elif not 0 <= version < 1 << 63:
            self.fail("version", f"must be 0..{(1 << 63) - 1}, got {version}")

        lb, lb_canon = self.parse_lb(top["lb"])

        raw_services = top.get("service")
        if raw_services is None:
            self.fail("service", "at least one [[service]] is required")
        if isinstance(raw_services, dict):
            self.fail("service", "must be an array of tables: write [[service]], not [service]")
        if not isinstance(raw_services, list):
            self.fail("service", f"must be an array of tables ([[service]]), got {_type_name(raw_services)}")
        if not raw_services:
            self.fail("service", "at least one [[service]] is required")
        fallback_file_key = self.key_file(top["lb"], "fallback_key_file", "lb")

        services: list[ServiceConfig] = []
        service_canon: list[dict[str, Any]] = []
        for index, raw in enumerate(raw_services):
            service, canon = self.parse_service(raw, f"service[{index}]", lb, fallback_file_key)
            for other_index, other in enumerate(services):
                if other.name == service.name:
                    self.fail(
                        f"service[{index}].name",
                        f"duplicate service name {service.name!r} (also service[{other_index}])",
                    )
                if _conflicts(other.vip, service.vip):
                    self.fail(
                        f"service[{index}].vip",
                        f"{format_address(service.vip)} collides with service[{other_index}].vip "
                        f"{format_address(other.vip)}; every service needs its own VIP",
                    )
            for other_index, other in enumerate(services):
                for b_index, b in enumerate(service.backends):
                    bwhere = f"service[{index}].backend[{b_index}].address"
                    if b.address == other.vip:
                        self.fail(bwhere, f"{format_address(b.address)} is service[{other_index}].vip")
                    if any(o.address == b.address for o in other.backends):
                        self.fail(
                            bwhere,
                            f"{format_address(b.address)} is also a backend of service[{other_index}]; a "
                            "backend serves one service (it answers with that service's VIP)",
                        )
                for b_index, b in enumerate(other.backends):
                    if b.address == service.vip:
                        self.fail(f"service[{other_index}].backend[{b_index}].address",
                                  f"{format_address(b.address)} is service[{index}].vip")
            services.append(service)
            service_canon.append(canon)

        largest = max(len(s.backends) for s in services)
        if lb.maglev_size < MAGLEV_SLOTS_PER_BACKEND * largest:
            self.fail(
                "lb.maglev_size",
                f"must be at least {MAGLEV_SLOTS_PER_BACKEND} x the largest service's backend count "
                f"({MAGLEV_SLOTS_PER_BACKEND} x {largest} = {MAGLEV_SLOTS_PER_BACKEND * largest}), "
                f"got {lb.maglev_size}",
            )

        canonical = {
            "format": 1,
            "version": version,
            "lb": lb_canon,
            "services": sorted(service_canon, key=lambda s: str(s["name"])),
        }
        encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        digest = hashlib.sha256(encoded.encode("ascii")).hexdigest()
        return LbConfig(path=self.path, lb=lb, services=tuple(services), version=version, digest=digest)

    def parse_lb(self, raw: object) -> tuple[LbSection, dict[str, Any]]:
        where = "lb"
        t = self.table(raw, where, _LB_KEYS, required=("inside",))
        inside = self.address(t, "inside", where)
        assert inside is not None
        inside_ip = ipaddress.ip_address(inside[0])
        if inside_ip.is_unspecified:
            self.fail(
                "lb.inside",
                f"{format_address(inside)} is a wildcard; give the exact address backends send to "
                "(they accept encapsulated datagrams only from it)",
            )
        if not (inside_ip.is_loopback or inside_ip.is_private or inside_ip.is_link_local):
            # The LB sends whatever arrives here from a backend address out of the VIP; on a
            # public address one spoofed datagram would make it a reflector (design §4).
            self.fail(
                "lb.inside",
                f"{format_address(inside)} is a public address; the backend-facing port must be on "
                "loopback or a private network",
            )
        return_mode = self.enum(t, "return_mode", where, ReturnMode, ReturnMode.VIA_LB)
        unroutable = self.enum(t, "unroutable_short_header", where, UnroutableShortHeader, UnroutableShortHeader.DROP)
        admin_bind_any = self.boolean(t, "admin_bind_any", where, False)
        admin = self.address(t, "admin", where, allow_port_zero=True)
        admin_token_file = self.file_path(t, "admin_token_file", where)
        if admin is not None:
            if admin_token_file is None:
                self.fail(
                    "lb.admin_token_file",
                    "required when lb.admin is set: every admin route except /healthz needs a bearer "
                    "token (create a 0600 file holding a random token)",
                )
            if not ipaddress.ip_address(admin[0]).is_loopback and not admin_bind_any:
                self.fail(
                    "lb.admin",
                    f"{format_address(admin)} is not a loopback address (127.0.0.0/8 or ::1); "
                    "set lb.admin_bind_any = true to expose the admin API",
                )
        if admin_token_file is not None:
            try:
                read_token_file(admin_token_file)
            except ConfigError as exc:
                self.fail("lb.admin_token_file", str(exc))
        fallback_key_file = self.file_path(t, "fallback_key_file", where)

        maglev_size = self.typed(t, "maglev_size", where, int, "an integer")
        if maglev_size is None:
            maglev_size = DEFAULT_MAGLEV_SIZE
        elif not MIN_MAGLEV_SIZE <= maglev_size <= MAX_MAGLEV_SIZE or not is_prime(maglev_size):
            self.fail(
                "lb.maglev_size",
                f"must be a prime number {MIN_MAGLEV_SIZE}..{MAX_MAGLEV_SIZE} (e.g. 65537), got {maglev_size}; "
                "the table builds in pure Python on every health change and reload, and larger tables "
                "take over 0.2 s",
            )

        def seconds(key: str, default: float, bounds: tuple[float, float]) -> float:
            value = self.typed(t, key, where, float, "a number of seconds")
            if value is None:
                return default
            low, high = bounds
            if not (math.isfinite(value) and low <= value <= high):
                self.fail(f"lb.{key}", f"must be {low:g}..{high:g} seconds, got {value:g}")
            return value

        health_interval = seconds("health_interval", 0.5, HEALTH_INTERVAL_RANGE)
        health_timeout = seconds("health_timeout", min(0.5, health_interval), HEALTH_TIMEOUT_RANGE)
        if health_timeout > health_interval:
            self.fail(
                "lb.health_timeout",
                f"must not exceed lb.health_interval ({health_interval:g}), got {health_timeout:g}: one probe "
                "per backend is outstanding at a time, so a longer timeout would stretch the interval",
            )
        health_threshold = self.typed(t, "health_threshold", where, int, "an integer")
        low, high = HEALTH_THRESHOLD_RANGE
        if health_threshold is None:
            health_threshold = 3
        elif not low <= health_threshold <= high:
            self.fail(
                "lb.health_threshold",
                f"must be {low}..{high}, got {health_threshold} (consecutive missed probes before a backend "
                "is marked down)",
            )

        supported_versions = self.parse_versions(t)
        lb_sources = self.parse_lb_sources(t, inside)

        section = LbSection(
            inside=inside,
            return_mode=return_mode,
            admin=admin,
            admin_token_file=admin_token_file,
            unroutable_short_header=unroutable,
            fallback_key_file=fallback_key_file,
            maglev_size=maglev_size,
            health_interval=health_interval,
            health_timeout=health_timeout,
            health_threshold=health_threshold,
            supported_versions=supported_versions,
            lb_sources=lb_sources,
            admin_bind_any=admin_bind_any,
        )
        canon = {
            "inside": format_address(inside),
            "return_mode": return_mode.value,
            "admin": None if admin is None else format_address(admin),
            # Paths as written, so the digest does not depend on where the file lives.
            "admin_token_file": t.get("admin_token_file"),
            "unroutable_short_header": unroutable.value,
            "maglev_size": maglev_size,
            "health_interval": health_interval,
            "health_timeout": health_timeout,
            "health_threshold": health_threshold,
            "supported_versions": list(supported_versions),
            "lb_sources": [format_address(a) for a in lb_sources],
            "admin_bind_any": admin_bind_any,
            # fallback_key_file content enters the digest through each service's fallback_key.
            "fallback_key_file": fallback_key_file is not None,
        }
        return section, canon

    def parse_versions(self, t: Mapping[str, Any]) -> tuple[int, ...]:
        raw = self.typed(t, "supported_versions", "lb", list, "an array of integers")
        if raw is None:
            return DEFAULT_SUPPORTED_VERSIONS
        if not raw:
            self.fail("lb.supported_versions", "must list at least one QUIC version")
        versions: list[int] = []
        for index, value in enumerate(raw):
            where = f"lb.supported_versions[{index}]"
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(where, f"must be an integer such as 0x00000001, got {_type_name(value)}")
            if not 1 <= value <= 0xFFFFFFFF:
                self.fail(where, f"must be 0x00000001..0xffffffff (0 is Version Negotiation), got {value}")
            if _is_greased_version(value):
                self.fail(where, f"0x{value:08x} is a reserved greasing version (RFC 9000 §15)")
            if value in versions:
                self.fail(where, f"duplicate version 0x{value:08x}")
            versions.append(value)
        return tuple(versions)

    def parse_lb_sources(self, t: Mapping[str, Any], inside: Address) -> tuple[Address, ...]:
        raw = self.typed(t, "lb_sources", "lb", list, 'an array of "IP:port" strings')
        if raw is None:
            return ()
        sources: list[Address] = []
        for index, value in enumerate(raw):
            where = f"lb.lb_sources[{index}]"
            address = parse_address(value, f"{self.path}: {where}")
            if address == inside or address in sources:
                self.fail(where, f"duplicate address {format_address(address)}")
            sources.append(address)
        return tuple(sources)

    def parse_service(
        self, raw: object, where: str, lb: LbSection, fallback_file_key: bytes | None
    ) -> tuple[ServiceConfig, dict[str, Any]]:
        t = self.table(raw, where, _SERVICE_KEYS, required=("name", "vip", "cid_config"))
        name = self.string(t, "name", where)
        assert name is not None
        if not _SERVICE_NAME.fullmatch(name):
            self.fail(
                f"{where}.name",
                f"must be 1..64 characters of letters, digits, '_', '.', '-', starting with a letter "
                f"or digit (it appears in metrics labels and --service), got {name!r}",
            )
        vip = self.address(t, "vip", where)
        assert vip is not None
        if _conflicts(vip, lb.inside):
            self.fail(
                f"{where}.vip",
                f"{format_address(vip)} collides with lb.inside {format_address(lb.inside)}; "
                "the VIP and the backend-facing address must differ",
            )

        if lb.return_mode is ReturnMode.DIRECT and _family(vip) == 6:
            self.fail(
                f"{where}.vip",
                f"{format_address(vip)}: return_mode \"direct\" supports IPv4 VIPs only (the backends "
                "forge the VIP as source with a raw IPv4 socket)",
            )
        certificate = self.file_path(t, "certificate", where)
        private_key = self.file_path(t, "private_key", where)
        if (certificate is None) != (private_key is None):
            missing = "private_key" if private_key is None else "certificate"
            self.fail(f"{where}.{missing}", "certificate and private_key must be set together (or neither)")
        for key, file in (("certificate", certificate), ("private_key", private_key)):
            if file is not None and not file.is_file():
                self.fail(f"{where}.{key}", f"file not found: {file}")

        raw_configs = t["cid_config"]
        if not isinstance(raw_configs, list):
            self.fail(f"{where}.cid_config", "must be an array of tables: write [[service.cid_config]]")
        if not 1 <= len(raw_configs) <= MAX_CID_CONFIGS:
            self.fail(
                f"{where}.cid_config",
                f"must list 1..{MAX_CID_CONFIGS} configurations (config IDs 0..6), got {len(raw_configs)}",
            )
        cid_configs: list[CidConfig] = []
        config_canon: list[dict[str, Any]] = []
        for index, raw_config in enumerate(raw_configs):
            config, canon = self.parse_cid_config(raw_config, f"{where}.cid_config[{index}]")
            for other_index, other in enumerate(cid_configs):
                if other.config_id == config.config_id:
                    self.fail(
                        f"{where}.cid_config[{index}].config_id",
                        f"duplicate config_id {config.config_id} (also {where}.cid_config[{other_index}])",
                    )
            if cid_configs and config.server_id_len != cid_configs[0].server_id_len:
                self.fail(
                    f"{where}.cid_config[{index}].server_id_len",
                    f"must equal {where}.cid_config[0].server_id_len ({cid_configs[0].server_id_len}), "
                    f"got {config.server_id_len}: each backend has one server ID used with every "
                    "cid_config of its service",
                )
            cid_configs.append(config)
            config_canon.append(canon)
        sid_len = cid_configs[0].server_id_len

        raw_backends = t.get("backend", [])
        if not isinstance(raw_backends, list):
            self.fail(f"{where}.backend", "must be an array of tables: write [[service.backend]]")
        backends: list[BackendConfig] = []
        for index, raw_backend in enumerate(raw_backends):
            bwhere = f"{where}.backend[{index}]"
            backend = self.parse_backend(raw_backend, bwhere, sid_len)
            for other_index, seen in enumerate(backends):
                also = f"(also {where}.backend[{other_index}])"
                if seen.server_id == backend.server_id:
                    self.fail(f"{bwhere}.server_id", f"duplicate server_id {backend.server_id.hex()} {also}")
                if seen.address == backend.address:
                    self.fail(
                        f"{bwhere}.address",
                        f"duplicate address {format_address(backend.address)} {also}",
                    )
            if _family(backend.address) != _family(lb.inside):
                self.fail(
                    f"{bwhere}.address",
                    f"{format_address(backend.address)} is IPv{_family(backend.address)} but lb.inside "
                    f"{format_address(lb.inside)} is IPv{_family(lb.inside)}; the LB sends to backends "
                    "from the inside socket, so both must be the same family",
                )
            for label, own in (("lb.inside", lb.inside), (f"{where}.vip", vip)):
                if backend.address == own:
                    self.fail(
                        f"{bwhere}.address",
                        f"{format_address(backend.address)} is {label}; the LB would send to itself",
                    )
            backends.append(backend)

        cid_keys = [c.key for c in cid_configs if c.key is not None]
        fallback_key = derive_fallback_key(name, cid_keys, fallback_file_key)
        service = ServiceConfig(
            name=name,
            vip=vip,
            certificate=certificate,
            private_key=private_key,
            cid_configs=tuple(cid_configs),
            backends=tuple(backends),
            fallback_key=fallback_key,
            linkable=any(c.key is None for c in cid_configs),
        )
        canon = {
            "name": name,
            "vip": format_address(vip),
            "certificate": t.get("certificate"),
            "private_key": t.get("private_key"),
            "cid_configs": config_canon,
            # Order of backends does not affect routing (tables are built sorted by server ID).
            "backends": sorted(
                (
                    {
                        "server_id": b.server_id.hex(),
                        "address": format_address(b.address),
                        "state": b.state.value,
                    }
                    for b in backends
                ),
                key=lambda b: b["server_id"],
            ),
            "fallback_key": _fingerprint(fallback_key),
        }
        return service, canon

    def parse_cid_config(self, raw: object, where: str) -> tuple[CidConfig, dict[str, Any]]:
        t = self.table(raw, where, _CID_CONFIG_KEYS, required=("config_id", "server_id_len", "nonce_len"))
        config_id = t["config_id"]
        if config_id == UNROUTABLE_CONFIG_ID and not isinstance(config_id, bool):
            self.fail(
                f"{where}.config_id",
                "config_id 7 (0b111) is reserved for unroutable CIDs (draft-ietf-quic-load-balancers-21 "
                "§3.2); use 0..6",
            )
        plaintext = self.boolean(t, "plaintext", where, False)
        has_key_file = "key_file" in t
        if has_key_file and plaintext:
            self.fail(f"{where}.plaintext", "set either key_file or plaintext = true, not both")
        if not has_key_file and not plaintext:
            self.fail(
                f"{where}.key_file",
                'missing: add key_file = "..." (create one with `quiclb keygen`), or set plaintext = true '
                "to accept linkable CIDs",
            )
        key = self.key_file(t, "key_file", where)
        try:
            config = CidConfig(
                config_id=config_id,
                server_id_len=t["server_id_len"],
                nonce_len=t["nonce_len"],
                key=key,
                self_encode_length=t.get("self_encode_length", True),
            )
        except ValueError as exc:
            # CidConfig names the field first ("nonce_len: must be 4..18, got 3").
            self.fail(where + "." + str(exc).split(": ", 1)[0], str(exc).split(": ", 1)[-1])
        canon = {
            "config_id": config.config_id,
            "server_id_len": config.server_id_len,
            "nonce_len": config.nonce_len,
            "key": None if key is None else _fingerprint(key),
            "self_encode_length": config.self_encode_length,
        }
        return config, canon

    def parse_backend(self, raw: object, where: str, sid_len: int) -> BackendConfig:
        t = self.table(raw, where, _BACKEND_KEYS, required=("server_id", "address"))
        sid_text = self.string(t, "server_id", where)
        assert sid_text is not None
        if not _HEX.fullmatch(sid_text) or len(sid_text) % 2:
            example = "00" * (sid_len - 1) + "01"
            problem = f"must be an even number of hex digits (e.g. {example!r}), got {sid_text!r}"
            self.fail(f"{where}.server_id", problem)
        server_id = bytes.fromhex(sid_text)
        if len(server_id) != sid_len:
            self.fail(
                f"{where}.server_id",
                f"must be {sid_len} bytes ({2 * sid_len} hex digits) to match server_id_len of every "
                f"cid_config of this service (one server ID per backend), got {len(server_id)}",
            )
        address = self.address(t, "address", where)
        assert address is not None
        state = self.enum(t, "state", where, BackendState, BackendState.ACTIVE)
        return BackendConfig(server_id=server_id, address=address, state=state)
