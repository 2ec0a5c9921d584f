"""The configuration's data model: frozen dataclasses, enums and pure helpers (design.md §5).

Validation lives in :mod:`lb.control.config_parser`; :mod:`lb.control.config`
loads files and re-exports everything here, which is the import path to use.
"""


from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from lb.core.cid_config import CidConfig
from lb.errors import ConfigError

Address = tuple[str, int]

#: Default Maglev table size M (prime; Maglev paper's default).
DEFAULT_MAGLEV_SIZE = 65537
#: M must be at least this many times the backend count for good balance (Maglev §3.4).
MAGLEV_SLOTS_PER_BACKEND = 100
#: Smallest M: the first prime >= 100 slots for one backend.
MIN_MAGLEV_SIZE = 101
#: Upper bound on M (the largest prime below 2**18): the pure-Python build of
#: lb/core/maglev.py takes ~0.15-0.2 s at this size with 10-2621 backends on the
#: 2-core reference machine (65537: ~30 ms; 1048573: ~0.5-0.65 s), and a table is
#: rebuilt on every health change and reload. It still allows 2621 backends per service.
MAX_MAGLEV_SIZE = 262139
#: Health probe schedule bounds, seconds (interval, timeout) and probes (threshold): below
#: the interval's floor the prober burns a core; above it a dead backend goes unnoticed for
#: an hour (3600 s is how benchmarks switch probing practically off). A timeout above the
#: interval would silently stretch the interval (one probe is outstanding per backend).
HEALTH_INTERVAL_RANGE = (0.05, 3600.0)
HEALTH_TIMEOUT_RANGE = (0.01, 60.0)
HEALTH_THRESHOLD_RANGE = (1, 100)
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
    """Extension: consecutive missed probes that mark a backend down; one answer marks it up again."""
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
    if isinstance(ip, ipaddress.IPv6Address):
        # No socket here can bind or reach these (EINVAL): say so now, not at bind time.
        if ip.scope_id is not None:
            raise ConfigError(
                f"{where}: {host!r} has an interface scope (%{ip.scope_id}); scoped addresses are not "
                "supported, use a global or unique-local IPv6 address"
            )
        if ip.ipv4_mapped is not None:
            raise ConfigError(
                f"{where}: {host!r} is an IPv4-mapped IPv6 address; IPv6 sockets here are IPv6-only, "
                f'write the IPv4 address instead ("{ip.ipv4_mapped}:{port_text}")'
            )
        if ip.is_link_local:
            raise ConfigError(
                f"{where}: {host!r} is an IPv6 link-local address (fe80::/10), which needs an interface "
                "scope; use a global or unique-local IPv6 address"
            )
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


