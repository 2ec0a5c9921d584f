"""Read-only views of a running LB, handed to the admin API and the metrics renderer.

Every component exposes ``stats()`` returning a frozen snapshot (router,
return path, datapath, health checker, table builder, reloader); the app
gathers them into one :class:`LbSnapshot` on demand, and the functions below
derive the per-service and per-backend views from them. Nothing here holds
live references into the datapath. Counters are monotonic for the life of the
process: reloads never reset them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lb.control.config import BackendState, LbConfig
from lb.core.addresses import format_address
from lb.core.health import HealthKey, HealthStatus
from lb.core.outcomes import RouterStats
from lb.core.return_path import ReturnStats
from lb.core.service_table import ServiceTable

if TYPE_CHECKING:
    from lb.control.reload import ReloadStats
    from lb.control.table_builder import TableBuilderStats


class DatapathCounters(Protocol):
    """What the views read of a datapath's stats (``lb.adapters.datapath.DatapathStats`` has this shape;
    named structurally so that control does not import the adapters)."""

    @property
    def rx_client_datagrams(self) -> int: ...
    @property
    def rx_backend_datagrams(self) -> int: ...
    @property
    def tx_to_backend(self) -> Mapping[tuple[str, str], int]: ...
    @property
    def backend_unreachable(self) -> Mapping[tuple[str, str], int]: ...
    @property
    def tx_to_client_errors(self) -> int: ...
    @property
    def drops(self) -> Mapping[str, int]: ...
    @property
    def socket_errors(self) -> Mapping[str, int]: ...


@dataclass(frozen=True)
class BackendView:
    service: str
    server_id: str  # hex
    address: str  # "ip:port"
    state: str  # "active" | "draining" | "removed" (tombstone)
    healthy: bool
    in_fallback: bool  # takes new (fallback) flows
    tx_datagrams: int
    unreachable: int
    probes: int
    probe_replies: int
    last_probe_rtt: float | None
    #: Long-header replies whose SCID does not decode to this backend under the LB's
    #: configurations: the backend mints CIDs with a key or config the LB lacks.
    stale_cid_replies: int = 0
    #: The last handshake SCID seen from this backend did not decode to it (cleared by one that does).
    stale_config: bool = False


@dataclass(frozen=True)
class ServiceView:
    name: str
    vip: str
    config_ids: tuple[int, ...]
    linkable: bool  # a plaintext configuration is live: CIDs can be linked by observers
    fallback_backends: int


@dataclass(frozen=True)
class LbSnapshot:
    routers: tuple[RouterStats, ...]
    return_path: ReturnStats
    services: tuple[ServiceView, ...]
    backends: tuple[BackendView, ...]
    config_path: str
    config_version: int
    config_digest: str
    config_reloads: int
    config_rejected: int
    last_reload_error: str | None
    fallback_table_builds: int
    started_at: float  # unix time
    pid: int
    extra: Mapping[str, int] = field(default_factory=dict)  # adapter-level counters (e.g. send errors)
    #: The datapath's own counters (receive totals, sends, drops); None in snapshots built by hand.
    datapath: DatapathCounters | None = None


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    message: str
    config_version: int
    config_digest: str


def service_views(config: LbConfig, tables: Mapping[str, ServiceTable]) -> tuple[ServiceView, ...]:
    out = []
    for svc in config.services:
        table = tables.get(svc.name)
        out.append(ServiceView(
            name=svc.name, vip=format_address(svc.vip), config_ids=tuple(c.config_id for c in svc.cid_configs),
            linkable=svc.linkable, fallback_backends=len(table.fallback_backends) if table else 0,
        ))
    return tuple(out)


def backend_views(
    config: LbConfig,
    tables: Mapping[str, ServiceTable],
    health: Mapping[HealthKey, HealthStatus],
    datapath: DatapathCounters,
    returns: ReturnStats,
) -> tuple[BackendView, ...]:
    """Configured backends, then the tombstoned (recently removed) ones, per service."""
    out = []
    for svc in config.services:
        table = tables.get(svc.name)
        for b in svc.backends:
            key = (svc.name, b.server_id.hex())
            status = health.get((svc.name, b.server_id))
            routed = table.backends.get(b.server_id) if table else None
            out.append(BackendView(
                service=svc.name, server_id=key[1], address=format_address(b.address),
                state="draining" if b.state is BackendState.DRAINING else "active",
                # What routing uses: a flip counts once its table is installed (builds run off the loop).
                healthy=routed.healthy if routed else (status.healthy if status else True),
                in_fallback=bool(table and b.server_id in table.fallback_backends),
                tx_datagrams=datapath.tx_to_backend.get(key, 0),
                unreachable=datapath.backend_unreachable.get(key, 0),
                probes=status.probes if status else 0,
                probe_replies=status.replies if status else 0,
                last_probe_rtt=status.last_rtt if status else None,
                stale_cid_replies=returns.stale_cid_replies.get(key, 0),
                stale_config=returns.stale_config.get(key, False),
            ))
        for sid in sorted(table.tombstones) if table else ():
            key = (svc.name, sid.hex())
            out.append(BackendView(
                service=svc.name, server_id=key[1], address="", state="removed", healthy=False,
                in_fallback=False, tx_datagrams=datapath.tx_to_backend.get(key, 0),
                unreachable=0, probes=0, probe_replies=0, last_probe_rtt=None,
            ))
    return tuple(out)


def route_info(tables: Mapping[str, ServiceTable], service: str | None, dcid: bytes) -> dict[str, object]:
    """"Which backend owns this CID?" for the admin API (no traffic is generated)."""
    if service is not None and service not in tables:
        raise LookupError(f"no service named {service!r}")
    out: dict[str, object] = {"dcid_len": len(dcid)}
    for name, table in tables.items():
        if service is not None and name != service:
            continue
        sid = table.decoder.decode(dcid)
        backend = table.backends.get(sid) if sid is not None else None
        out[name] = {
            "config_id": dcid[0] >> 5 if dcid else None,
            "server_id": sid.hex() if sid is not None else None,
            "backend": format_address(backend.address) if backend else None,
            "routable": backend is not None,
            "tombstoned": sid in table.tombstones if sid is not None else False,
        }
    return out


def gather_snapshot(
    config: LbConfig,
    tables: Mapping[str, ServiceTable],
    routers: tuple[RouterStats, ...],
    *,
    returns: ReturnStats,
    datapath: DatapathCounters,
    health: Mapping[HealthKey, HealthStatus],
    reloads: ReloadStats,
    builds: TableBuilderStats,
    started_at: float,
    extra: Mapping[str, int],
) -> LbSnapshot:
    """One :class:`LbSnapshot` from every component's own ``stats()``."""
    # What the sockets received before any routing: with the drops below, the end-to-end sum
    # quiclb_adapter_rx_client_datagrams = sum of the routers' outcomes + adapter drops holds.
    adapter = {"tx_to_client_errors": datapath.tx_to_client_errors,
               "rx_client_datagrams": datapath.rx_client_datagrams,
               "rx_backend_datagrams": datapath.rx_backend_datagrams, **extra}
    adapter.update({f"drop_{reason}": n for reason, n in datapath.drops.items()})
    adapter.update({f"socket_errors_{role}": n for role, n in datapath.socket_errors.items()})
    return LbSnapshot(
        routers=routers,
        return_path=returns,
        services=service_views(config, tables),
        backends=backend_views(config, tables, health, datapath, returns),
        config_path=str(config.path), config_version=config.version, config_digest=config.digest,
        config_reloads=reloads.reloads, config_rejected=reloads.rejected,
        last_reload_error=reloads.last_reload_error,
        fallback_table_builds=builds.fallback_table_builds,
        started_at=started_at, pid=os.getpid(), extra=adapter, datapath=datapath,
    )
