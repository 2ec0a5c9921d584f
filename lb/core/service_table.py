"""ServiceTable: the immutable routing snapshot of one service (one VIP).

Built by the control plane (``lb.control.table_builder``) whenever the
configuration or a backend's health changes, and handed to the router whole;
the datapath only reads it. Nothing here is mutated after construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from lb.core.addresses import Address, normalize_address
from lb.core.cid_config import CidConfig
from lb.core.cid_decoder import CidDecoder
from lb.core.lb_replies import RetryPolicy
from lb.core.maglev import DEFAULT_TABLE_SIZE, MaglevTable, build_maglev_table
from lb.core.quic_constants import KNOWN_VERSIONS


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend as the router sees it."""

    server_id: bytes
    address: Address
    #: Draining backends keep their CID routes but get no new fallback flows.
    draining: bool = False
    #: Health as last measured by the probes; unhealthy backends get no fallback flows.
    healthy: bool = True
    #: Counter label: the server ID in hex.
    label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.server_id.hex())

    @property
    def takes_new_flows(self) -> bool:
        return self.healthy and not self.draining


@dataclass(frozen=True)
class ServiceTable:
    """Everything the router needs for one VIP.

    ``backends`` holds active and draining backends by server ID (a server ID
    maps to the same backend under every live configuration). ``tombstones``
    are server IDs of backends removed recently: datagrams for them are
    dropped and counted as ``removed_backend_dropped`` rather than as unknown.
    """

    name: str
    vip: Address
    cid_configs: tuple[CidConfig, ...]
    backends: Mapping[bytes, Backend]
    tombstones: frozenset[bytes]
    maglev: MaglevTable
    supported_versions: frozenset[int]
    short_header_fallback: bool
    #: Retry offload (None: off) and the stateless reset key (None: no resets).
    retry: RetryPolicy | None = field(default=None, repr=False)
    reset_key: bytes | None = field(default=None, repr=False)
    decoder: CidDecoder = field(init=False, repr=False)
    #: Backends in fallback rotation, by server ID (a subset of ``backends``).
    fallback_backends: tuple[bytes, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder", CidDecoder(self.cid_configs))
        object.__setattr__(self, "fallback_backends", self.maglev.names)


def build_service_table(
    *,
    name: str,
    vip: Address,
    cid_configs: Iterable[CidConfig],
    backends: Iterable[Backend],
    fallback_key: bytes,
    tombstones: Iterable[bytes] = (),
    maglev_size: int = DEFAULT_TABLE_SIZE,
    supported_versions: Iterable[int] = KNOWN_VERSIONS,
    short_header_fallback: bool = False,
    retry: RetryPolicy | None = None,
    reset_key: bytes | None = None,
) -> ServiceTable:
    """Validate and assemble a table; the Maglev ring covers healthy, non-draining backends."""
    by_sid: dict[bytes, Backend] = {}
    for b in backends:
        if b.server_id in by_sid:
            raise ValueError(f"server ID {b.server_id.hex()} appears twice in service {name!r}")
        by_sid[b.server_id] = b
    ring = build_maglev_table(
        [sid for sid, b in by_sid.items() if b.takes_new_flows], key=fallback_key, size=maglev_size
    )
    return ServiceTable(
        name=name,
        vip=normalize_address(vip),
        cid_configs=tuple(cid_configs),
        backends=MappingProxyType(by_sid),
        tombstones=frozenset(tombstones) - by_sid.keys(),
        maglev=ring,
        supported_versions=frozenset(supported_versions),
        short_header_fallback=short_header_fallback,
        retry=retry,
        reset_key=reset_key,
    )
