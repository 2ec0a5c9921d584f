"""Read-only views of a running LB, handed to the admin API and the metrics renderer.

The app builds an :class:`LbSnapshot` on demand from the routers' and
adapters' counters; nothing here holds live references into the datapath.
Counters are monotonic for the life of the process: reloads never reset them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lb.core.return_path import ReturnStats
from lb.core.router import RouterStats


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


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    message: str
    config_version: int
    config_digest: str
