"""The configuration: its validated values, and :func:`load_config` that produces them (design.md §5).

One TOML file is read by every LB instance and every backend. It is validated
as a whole into the frozen dataclasses below; the first problem found raises
:class:`~lb.errors.ConfigError` whose message is ``"<file>: <key path>: <problem>"``,
for example ``lb.toml: service[0].cid_config[1].nonce_len: must be 4..18, got 3``.
Nothing is half-applied: callers get a complete :class:`LbConfig` or an error,
so a failed reload keeps the running configuration (acceptance F-5).

Modules: this one is the model (import the configuration's names from here),
and :func:`load_config` / :func:`parse_config`, the only entry points;
:mod:`lb.control.config_parser` validates the document and ``[lb]`` and
:mod:`lb.control.config_service_parser` each ``[[service]]``, with the
primitives of :mod:`lb.control.config_reader`; :mod:`lb.control.config_digest`
derives :attr:`LbConfig.digest` from the dataclasses' fields (what is in it and
what is not is documented there); every file is read through
:func:`lb.control.files.read_regular_file` (regular files only, size-capped).
The parser imports this module's public names only; this module imports the
parser inside :func:`parse_config`, because the parser builds these classes.

Extensions beyond design.md §5 (all optional, keys only added, none renamed):
top-level ``version``; in ``[lb]``: ``maglev_size``, ``health_interval``,
``health_timeout``, ``health_threshold``, ``supported_versions``, ``lb_sources``
and ``admin_bind_any``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from lb.control.files import MAX_CONFIG_BYTES, read_regular_file
from lb.core.addresses import Address
from lb.core.cid_config import CidConfig
from lb.core.maglev import DEFAULT_TABLE_SIZE, MIN_SLOTS_PER_BACKEND
from lb.errors import ConfigError, LbError

#: Default Maglev table size M (prime; Maglev paper's default).
DEFAULT_MAGLEV_SIZE = DEFAULT_TABLE_SIZE
#: M must be at least this many times the backend count for good balance (Maglev §3.4).
MAGLEV_SLOTS_PER_BACKEND = MIN_SLOTS_PER_BACKEND
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
#: Services in one file: each binds a socket and has its own Maglev table, rebuilt on reloads.
MAX_SERVICES = 64
#: Backends of one service: a Maglev table needs 100 slots per backend, and M <= MAX_MAGLEV_SIZE.
MAX_BACKENDS_PER_SERVICE = MAX_MAGLEV_SIZE // MIN_SLOTS_PER_BACKEND
#: ``supported_versions`` entries (QUIC has a handful of versions).
MAX_SUPPORTED_VERSIONS = 32
#: ``lb_sources`` entries (one per other LB instance).
MAX_LB_SOURCES = 256
_PORT = re.compile(r"[0-9]{1,5}")
_FALLBACK_PERSON = b"quiclb-fallback"

# How a field enters LbConfig.digest (lb.control.config_digest reads these). A field without
# metadata enters with its value, so a new field is in the digest unless it says why not.
DIGEST = "digest"
#: Left out; the field's docstring says why (derived from other fields, or not content).
DIGEST_OMIT = {DIGEST: "omit"}
#: Key material: a one-way fingerprint, never the bytes.
DIGEST_FINGERPRINT = {DIGEST: "fingerprint"}
#: Only whether it is set (its content enters through another field).
DIGEST_PRESENCE = {DIGEST: "presence"}
#: Key material added after configurations were deployed (fingerprinted, left out when unset).
DIGEST_FINGERPRINT_IF_SET = {DIGEST: "fingerprint", "unless_default": True}
#: Added after configurations were deployed: left out while it has its default, so a file that
#: does not use it keeps the digest it had (LB instances of two releases agree on it).
DIGEST_UNLESS_DEFAULT = "unless_default"


def digest_sorted_by(attribute: str) -> dict[str, str]:
    """A collection whose order does not matter: it enters sorted by each item's ``attribute``."""
    return {DIGEST: "sorted", "sort_by": attribute}


#: ``retry_flood_threshold`` default and bounds.
DEFAULT_RETRY_FLOOD_THRESHOLD = 2000
RETRY_FLOOD_THRESHOLD_RANGE = (1, 10_000_000)


class ReturnMode(StrEnum):
    """How backend replies reach the client (design.md §4)."""

    VIA_LB = "via-lb"
    DIRECT = "direct"


class BackendState(StrEnum):
    """``DRAINING`` backends keep their connections but get no new ones from the fallback."""

    ACTIVE = "active"
    DRAINING = "draining"


class RetryMode(StrEnum):
    """``[[service]].retry``: when the LB answers tokenless Initials with Retry (issue 9)."""

    OFF = "off"
    ALWAYS = "always"
    FLOOD = "flood"  # only above retry_flood_threshold tokenless Initials per second


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
    backends: tuple[BackendConfig, ...] = field(metadata=digest_sorted_by("server_id"))
    """In file order; the digest sorts them (tables are built sorted by server ID)."""
    fallback_key: bytes = field(repr=False, metadata=DIGEST_FINGERPRINT)
    """32-byte Maglev fallback hash key, the same in every process and across CID key rotation
    (:func:`derive_fallback_key`)."""
    linkable: bool = field(metadata=DIGEST_OMIT)
    """True when any cid_config is plaintext: its CIDs are linkable (metrics say so, S-2).
    Not in the digest: derived from ``cid_configs``."""
    retry: RetryMode = field(default=RetryMode.OFF, metadata={DIGEST_UNLESS_DEFAULT: True})
    """Retry offload (draft-ietf-quic-retry-offload, shared-state mode); backends read it too."""
    retry_key: bytes | None = field(default=None, repr=False, metadata=DIGEST_FINGERPRINT_IF_SET)
    """The 16-byte token key of ``retry_key_file``; set unless ``retry`` is off."""
    retry_flood_threshold: int = field(default=DEFAULT_RETRY_FLOOD_THRESHOLD, metadata={DIGEST_UNLESS_DEFAULT: True})
    """``retry = "flood"``: tokenless Initials per second (per LB process) before Retry starts."""
    reset_key: bytes | None = field(default=None, repr=False, metadata=DIGEST_FINGERPRINT_IF_SET)
    """The key of ``reset_key_file``: stateless reset tokens are derived from it (LB and backends)."""

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
    fallback_key_file: Path | None = field(metadata=DIGEST_PRESENCE)
    """Only its presence is in the digest; its key enters through each service's ``fallback_key``."""
    maglev_size: int = DEFAULT_MAGLEV_SIZE
    """Extension: prime Maglev table size, >= 100 x the backends of every service."""
    health_interval: float = 0.5
    """Extension: seconds between health probes to each backend, 0.05..3600."""
    health_timeout: float = 0.5
    """Extension: seconds to wait for a probe reply, 0.01..60 and at most ``health_interval``
    (absent: 0.5, or ``health_interval`` when that is shorter)."""
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

    path: Path = field(metadata=DIGEST_OMIT)
    """Where the file was read from; not in the digest (equal files anywhere have equal digests)."""
    lb: LbSection
    services: tuple[ServiceConfig, ...] = field(metadata=digest_sorted_by("name"))
    version: int
    """Extension: operator-set monotonic top-level ``version``; 0 when absent."""
    digest: str = field(metadata=DIGEST_OMIT)
    """SHA-256 hex of the canonical validated config (:mod:`lb.control.config_digest`)."""

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


def type_name(value: object) -> str:
    """How error messages name a TOML value's type ("an integer", "a table", ...)."""
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
    Errors are :class:`ConfigError` starting with ``where``. The inverse is
    :func:`lb.core.addresses.format_address`.
    """
    if not isinstance(text, str):
        raise ConfigError(f'{where}: must be a string like "127.0.0.1:4433", got {type_name(text)}')
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


def derive_fallback_key(service_name: str, fallback_file_key: bytes | None) -> bytes:
    """The 32-byte fallback hash key of a service; a pure function of the configuration.

    ``blake2b(key=K, person="quiclb-fallback", data=service name)``, where K is
    the key of ``[lb].fallback_key_file`` (one secret shared by all services,
    domain-separated by name), or empty when the file is not set.

    It never depends on the service's CID keys (issue 13, hole 2): a key
    rotation adds a ``cid_config`` and later removes the old one, and a
    fallback key that changed with either step would rebuild the Maglev table
    under a new key, moving the Initials of handshakes in flight to other
    backends - and, during a rolling reload, two LB instances (one reloaded,
    one not) would send one handshake's Initials to different backends. No
    CID key survives a full rotation, so none can be the root of a stable key.
    Never process-local randomness either: every LB instance must compute the
    same Maglev table (design.md §3).

    Trade-off without the file: the derived key is stable and identical
    everywhere, but it is computed from public data (the service name), so
    anyone who knows the name can compute the Maglev table and aim Initials at
    a chosen backend (acceptance S-6). Deployments should set
    ``fallback_key_file`` (``quiclb keygen -o fallback.key``, the same file on
    every LB instance); ``quiclb check-config`` flags services without it.
    """
    hash_key = b"" if fallback_file_key is None else fallback_file_key
    return hashlib.blake2b(service_name.encode("utf-8"), digest_size=32, key=hash_key, person=_FALLBACK_PERSON).digest()


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> LbConfig:
    """Read, parse and validate the TOML file at ``path``.

    Raises only :class:`~lb.errors.ConfigError` (one line, naming the file) for
    anything wrong with the file or its content, so a reload can always be
    rejected cleanly: a FIFO, device or directory, a file over
    :data:`~lb.control.files.MAX_CONFIG_BYTES`, bad UTF-8 or TOML, values
    nested too deeply for the parser, and any unexpected failure while validating.
    """
    path = Path(path)
    raw = read_regular_file(path, MAX_CONFIG_BYTES, "configuration").data
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
    except RecursionError:
        raise ConfigError(f"{path}: TOML values are nested too deeply to parse; refusing it") from None
    except Exception as exc:  # tomllib has no other documented errors; never let one escape a reload
        raise ConfigError(f"{path}: TOML parser failed: {_one_line(exc)}") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path) -> LbConfig:
    """Validate an already-parsed TOML document; relative paths resolve against ``path.parent``.

    Raises only :class:`~lb.errors.ConfigError`: a failure the validator did not
    anticipate (a bug, or a document nested too deeply) is reported as one.
    """
    # The parser builds the model defined above, so it is imported here, not at the top.
    from lb.control.config_parser import Parser  # noqa: PLC0415

    path = Path(path)
    try:
        return Parser(path).parse(data)
    except LbError:
        raise
    except RecursionError:
        raise ConfigError(f"{path}: values are nested too deeply to validate; refusing them") from None
    except Exception as exc:
        raise ConfigError(f"{path}: unexpected error while validating: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
