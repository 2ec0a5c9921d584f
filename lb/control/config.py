"""Load and validate the TOML configuration (design.md §5, a contract).

One file is read by every LB instance and every backend. It is validated as a
whole into frozen dataclasses; the first problem found raises
:class:`~lb.errors.ConfigError` whose message is ``"<file>: <key path>: <problem>"``,
for example ``lb.toml: service[0].cid_config[1].nonce_len: must be 4..18, got 3``.
Nothing is half-applied: callers get a complete :class:`LbConfig` or an error,
so a failed reload keeps the running configuration (acceptance F-5).

Extensions beyond design.md §5 (all optional, keys only added, none renamed):
top-level ``version``; in ``[lb]``: ``maglev_size``, ``health_interval``,
``health_timeout``, ``health_threshold``, ``supported_versions``, ``lb_sources``
and ``admin_bind_any``.

Identity: :attr:`LbConfig.digest` is a SHA-256 over a canonical JSON form of
the validated values, with key material replaced by fingerprints, so every
process that reads equal files (and equal key files) reports the same digest
(design implication 5). It does not depend on where the file lives.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from lb.control.keys import read_key_file, read_token_file
from lb.core.cid_config import UNROUTABLE_CONFIG_ID, CidConfig
from lb.errors import ConfigError

Address = tuple[str, int]

#: Default Maglev table size M (prime; Maglev paper's default).
DEFAULT_MAGLEV_SIZE = 65537
#: M must be at least this many times the backend count for good balance (Maglev §3.4).
MAGLEV_SLOTS_PER_BACKEND = 100
#: Upper bound on M, so a typo cannot make every reload build a huge table.
MAX_MAGLEV_SIZE = 1 << 24
#: QUIC versions aioquic 1.7.2 backends speak: v1 (RFC 9000) and v2 (RFC 9369).
DEFAULT_SUPPORTED_VERSIONS: tuple[int, ...] = (0x00000001, 0x6B3343CF)
MAX_CID_CONFIGS = 7
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PORT = re.compile(r"[0-9]{1,5}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_FALLBACK_PERSON = b"quiclb-fallback"
_KEYSET_PERSON = b"quiclb-keyset"
_FINGERPRINT_PERSON = b"quiclb-keyfp"


class ReturnMode(StrEnum):
    """How backend replies reach the client (design.md §4)."""

    VIA_LB = "via-lb"
    DIRECT = "direct"


class BackendState(StrEnum):
    """``DRAINING`` backends keep their connections but get no new ones from the fallback."""

    ACTIVE = "active"
    DRAINING = "draining"


class UnroutableShortHeader(StrEnum):
    """What happens to a short header whose DCID names no backend (design.md §3 step 5)."""

    DROP = "drop"
    FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One ``[[service.backend]]``."""

    server_id: bytes
    """The backend's server ID, ``server_id_len`` bytes, the same under every cid_config."""
    address: Address
    """Where the LB sends encapsulated datagrams."""
    state: BackendState


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """One ``[[service]]``: a VIP, its QUIC-LB configurations and its backends.

    A service may have zero backends (an LB may start empty); the fallback then
    drops every datagram it would hash.
    """

    name: str
    vip: Address
    certificate: Path | None
    private_key: Path | None
    cid_configs: tuple[CidConfig, ...]
    """In file order; the LB decodes with all of them, backends mint with the last one."""
    backends: tuple[BackendConfig, ...]
    fallback_key: bytes = field(repr=False)
    """32-byte Maglev fallback hash key, the same in every process (:func:`derive_fallback_key`)."""
    linkable: bool
    """True when any cid_config is plaintext: its CIDs are linkable (metrics say so, S-2)."""

    def newest_cid_config(self) -> CidConfig:
        """The configuration backends mint new CIDs with: the last one listed."""
        return self.cid_configs[-1]

    def backend_by_server_id(self, sid: bytes) -> BackendConfig | None:
        """The backend with server ID ``sid``, or ``None``."""
        for backend in self.backends:
            if backend.server_id == sid:
                return backend
        return None


@dataclass(frozen=True, slots=True)
class LbSection:
    """The ``[lb]`` table."""

    inside: Address
    """LB address that backends talk to (and send via-lb replies to)."""
    return_mode: ReturnMode
    admin: Address | None
    """Admin API + /metrics listen address; loopback unless ``admin_bind_any``."""
    admin_token_file: Path | None
    """Bearer token file; required whenever ``admin`` is set (acceptance S-7)."""
    unroutable_short_header: UnroutableShortHeader
    fallback_key_file: Path | None
    maglev_size: int = DEFAULT_MAGLEV_SIZE
    """Extension: prime Maglev table size, >= 100 x the backends of every service."""
    health_interval: float = 0.5
    """Extension: seconds between health probes to each backend."""
    health_timeout: float = 0.5
    """Extension: seconds to wait for a probe reply."""
    health_threshold: int = 3
    """Extension: consecutive probe results needed to change a backend's health."""
    supported_versions: tuple[int, ...] = DEFAULT_SUPPORTED_VERSIONS
    """Extension: QUIC versions the backends speak; others are cheap-rejected (design.md §3)."""
    lb_sources: tuple[Address, ...] = ()
    """Extension: extra LB addresses backends accept encapsulated datagrams from, besides ``inside``."""
    admin_bind_any: bool = False
    """Extension: allow a non-loopback ``admin`` address (still requires the token file)."""


@dataclass(frozen=True, slots=True)
class LbConfig:
    """The whole validated file."""

    path: Path
    lb: LbSection
    services: tuple[ServiceConfig, ...]
    version: int
    """Extension: operator-set monotonic top-level ``version``; 0 when absent."""
    digest: str
    """SHA-256 hex of the canonical validated config (key material fingerprinted, never raw)."""

    def service(self, name: str | None) -> ServiceConfig:
        """The service called ``name``; ``None`` only when the file has exactly one service."""
        if name is None:
            if len(self.services) == 1:
                return self.services[0]
            names = ", ".join(s.name for s in self.services)
            raise ConfigError(
                f"{self.path}: service: {len(self.services)} services are configured ({names}); name one (--service)"
            )
        for service in self.services:
            if service.name == name:
                return service
        names = ", ".join(s.name for s in self.services)
        raise ConfigError(f"{self.path}: service: no service named {name!r} (configured: {names})")


# --------------------------------------------------------------------------- public helpers


def parse_address(text: str, where: str, *, allow_port_zero: bool = False) -> Address:
    """Parse ``"127.0.0.1:4433"`` or ``"[::1]:4433"`` into a normalised ``(ip, port)``.

    The host must be an IP literal: the LB never does DNS. Port 0 is refused
    unless ``allow_port_zero`` (the admin listener may ask for an ephemeral port).
    Errors are :class:`ConfigError` starting with ``where``.
    """
    if not isinstance(text, str):
        raise ConfigError(f'{where}: must be a string like "127.0.0.1:4433", got {_type_name(text)}')
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f'{where}: must be "IP:port" (e.g. "127.0.0.1:4433" or "[::1]:4433"), got {text!r}')
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f'{where}: an IPv6 address needs brackets, e.g. "[::1]:4433", got {text!r}')
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{where}: {host!r} is not an IP address; hostnames are not allowed (the LB does no DNS)"
        ) from None
    if bracketed and ip.version == 4:
        raise ConfigError(f"{where}: brackets are only for IPv6 addresses, got {text!r}")
    if not _PORT.fullmatch(port_text):
        raise ConfigError(f"{where}: port must be a decimal number, got {port_text!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{where}: port must be {low}..65535, got {port}")
    return (str(ip), port)


def format_address(address: Address) -> str:
    """Inverse of :func:`parse_address`: ``"127.0.0.1:4433"`` / ``"[::1]:4433"``."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def derive_fallback_key(service_name: str, cid_keys: Collection[bytes], fallback_file_key: bytes | None) -> bytes:
    """The 32-byte fallback hash key of a service; a pure function of the configuration.

    With ``[lb].fallback_key_file``: ``blake2b(key=file key, person="quiclb-fallback",
    data=service name)`` - one secret shared by all services, domain-separated by name.
    Otherwise the key is the sorted concatenation of the service's CID keys
    (pre-hashed to 64 bytes, since up to 7 x 16 bytes exceeds blake2b's key limit).
    Never process-local randomness: every LB instance must compute the same
    Maglev table (design.md §3).

    Security note: a service whose configurations are all plaintext has no
    secret to derive from, so its fallback key is public and clients can steer
    Initials to a chosen backend (acceptance S-6). Such services should set
    ``fallback_key_file``.
    """
    if fallback_file_key is not None:
        hash_key = fallback_file_key
    elif cid_keys:
        hash_key = hashlib.blake2b(b"".join(sorted(cid_keys)), person=_KEYSET_PERSON).digest()
    else:
        hash_key = b""
    return hashlib.blake2b(service_name.encode("utf-8"), digest_size=32, key=hash_key, person=_FALLBACK_PERSON).digest()


def is_prime(n: int) -> bool:
    """Deterministic primality test by trial division (n <= MAX_MAGLEV_SIZE is cheap)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def load_config(path: str | Path) -> LbConfig:
    """Read, parse and validate the TOML file at ``path``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: byte {exc.start}: not valid UTF-8 (TOML files are UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        where = re.search(r"\(at line (\d+), column (\d+)\)", message)
        if where:
            base = message[: where.start()].rstrip()
            raise ConfigError(
                f"{path}: line {where.group(1)}, column {where.group(2)}: TOML syntax error: {base}"
            ) from None
        raise ConfigError(f"{path}: TOML syntax error: {message}") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path) -> LbConfig:
    """Validate an already-parsed TOML document; relative paths resolve against ``path.parent``."""
    return _Parser(Path(path)).parse(data)


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


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


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


class _Parser:
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
        elif not 2 <= maglev_size <= MAX_MAGLEV_SIZE or not is_prime(maglev_size):
            self.fail(
                "lb.maglev_size",
                f"must be a prime number <= {MAX_MAGLEV_SIZE} (e.g. 65537), got {maglev_size}",
            )

        def positive_seconds(key: str, default: float) -> float:
            value = self.typed(t, key, where, float, "a number of seconds")
            if value is None:
                return default
            if not math.isfinite(value) or value <= 0:
                self.fail(f"lb.{key}", f"must be a finite number of seconds > 0, got {value}")
            return value

        health_interval = positive_seconds("health_interval", 0.5)
        health_timeout = positive_seconds("health_timeout", 0.5)
        health_threshold = self.typed(t, "health_threshold", where, int, "an integer")
        if health_threshold is None:
            health_threshold = 3
        elif health_threshold < 1:
            self.fail("lb.health_threshold", f"must be at least 1, got {health_threshold}")

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
