"""LbConfig + health + tombstones -> one immutable ServiceTable per service.

The only producer of routing tables. Pure apart from the tombstone memory it
keeps across reloads: when a reload removes a backend, its server ID stays
"tombstoned" for ``tombstone_seconds`` so that stale short-header datagrams
for it are counted as ``removed_backend_dropped`` (not as random garbage) and
operators can see the tail of its traffic (acceptance design implication 4).
"""

from __future__ import annotations

from collections.abc import Callable

from lb.control.config import BackendState, LbConfig, ServiceConfig, UnroutableShortHeader
from lb.core.service_table import Backend, ServiceTable, build_service_table
from lb.errors import ConfigError

#: aioquic's default idle timeout (60 s) plus a margin: long enough for every
#: client of a removed backend to have given up.
DEFAULT_TOMBSTONE_SECONDS = 90.0

HealthLookup = Callable[[str, bytes], bool]


class TableBuilder:
    """Builds tables; remembers removed server IDs until their tombstones expire."""

    def __init__(self, tombstone_seconds: float = DEFAULT_TOMBSTONE_SECONDS) -> None:
        self.tombstone_seconds = tombstone_seconds
        # service -> server ID -> (expiry, address it had)
        self._tombstones: dict[str, dict[bytes, tuple[float, tuple[str, int]]]] = {}
        self.builds = 0

    def note_reload(self, old: LbConfig | None, new: LbConfig, now: float) -> None:
        """Tombstone the server IDs that ``new`` drops from ``old``; clear re-added ones."""
        if old is not None:
            for svc in old.services:
                try:
                    kept = {b.server_id for b in new.service(svc.name).backends}
                except ConfigError:  # the whole service is gone
                    kept = set()
                stones = self._tombstones.setdefault(svc.name, {})
                for b in svc.backends:
                    if b.server_id not in kept:
                        stones[b.server_id] = (now + self.tombstone_seconds, b.address)
        for svc in new.services:
            stones = self._tombstones.get(svc.name, {})
            for b in svc.backends:
                stones.pop(b.server_id, None)

    def expire(self, now: float) -> bool:
        """Drop expired tombstones; True when any expired (tables need a rebuild)."""
        changed = False
        for stones in self._tombstones.values():
            for sid in [s for s, (t, _) in stones.items() if t <= now]:
                del stones[sid]
                changed = True
        return changed

    def reuse_warnings(self, new: LbConfig, now: float) -> list[str]:
        """Warnings for tombstoned server IDs given to another address before they expire.

        Clients of the removed backend may still send its CIDs, which the new
        backend will count as unknown and drop. Only a warning: tombstones live
        in each LB process's memory, and refusing the file here while a freshly
        started instance accepts it would split the instances across two
        configurations (every instance must run the same digest).
        """
        out = []
        for svc in new.services:
            stones = self._tombstones.get(svc.name, {})
            for b in svc.backends:
                stone = stones.get(b.server_id)
                if stone is not None and stone[1] != b.address:
                    out.append(
                        f"service {svc.name!r}: server ID {b.server_id.hex()} was removed from "
                        f"{stone[1][0]}:{stone[1][1]} less than {self.tombstone_seconds:.0f} s ago and is now "
                        f"given to {b.address[0]}:{b.address[1]}; stale CIDs of the old backend will reach it"
                    )
        return out

    def tombstones(self, service: str) -> frozenset[bytes]:
        return frozenset(self._tombstones.get(service, {}))

    def build_service(self, cfg: LbConfig, svc: ServiceConfig, healthy: HealthLookup) -> ServiceTable:
        backends = [
            Backend(
                server_id=b.server_id,
                address=b.address,
                draining=b.state is BackendState.DRAINING,
                healthy=healthy(svc.name, b.server_id),
            )
            for b in svc.backends
        ]
        self.builds += 1
        return build_service_table(
            name=svc.name,
            vip=svc.vip,
            cid_configs=svc.cid_configs,
            backends=backends,
            fallback_key=svc.fallback_key,
            tombstones=self.tombstones(svc.name),
            maglev_size=cfg.lb.maglev_size,
            supported_versions=cfg.lb.supported_versions,
            short_header_fallback=cfg.lb.unroutable_short_header is UnroutableShortHeader.FALLBACK,
        )

    def build(self, cfg: LbConfig, healthy: HealthLookup) -> dict[str, ServiceTable]:
        return {svc.name: self.build_service(cfg, svc, healthy) for svc in cfg.services}
