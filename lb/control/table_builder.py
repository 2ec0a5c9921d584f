"""LbConfig + health + tombstones + now -> one immutable ServiceTable per service.

The only producer of routing tables. :func:`build_tables` is a pure function
of ``(config, unhealthy backends, tombstones, now)``: the same inputs give the
same tables in every process, which is what lets several LB instances agree.

The expensive part of a table is its Maglev ring (tens of milliseconds of pure
Python for 65537 slots); everything else costs microseconds. So a build is
split in two (issue 13 item 3, no datapath stalls from the control plane):

1. :func:`ring_specs` says which rings the tables need (backend names, key,
   size); :class:`TableBuilder` keeps the rings it built last, so a ring whose
   inputs did not change — a health flap of another service, a tombstone
   expiry, an unchanged service in a reload, a backend flapping back to a set
   seen before — is never rebuilt;
2. missing rings are built in an executor (:meth:`TableBuilder.build_async`;
   the app passes a process pool, measured in ``bench/control_plane_pause.py``),
   then the tables are assembled on the loop and handed over whole.

Tombstones: when a reload removes a backend, its server ID stays "tombstoned"
for ``tombstone_seconds`` so that stale short-header datagrams for it are
counted as ``removed_backend_dropped`` (not as random garbage) and operators
can see the tail of its traffic. Their clock is the event loop's monotonic
clock, the same one the health checker uses.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import BrokenExecutor, Executor
from dataclasses import dataclass
from types import MappingProxyType

from lb.control.config import BackendState, LbConfig, LbSection, RetryMode, ServiceConfig, UnroutableShortHeader
from lb.core.addresses import Address, normalize_address
from lb.core.health import HealthKey
from lb.core.lb_replies import RetryPolicy
from lb.core.maglev import MaglevTable, build_maglev_table
from lb.core.retry_token import TokenKey
from lb.core.service_table import Backend, ServiceTable

log = logging.getLogger("quiclb")

#: aioquic's default idle timeout (60 s) plus a margin: long enough for every
#: client of a removed backend to have given up.
DEFAULT_TOMBSTONE_SECONDS = 90.0
#: Rings kept beyond those in use: a backend flapping between two states reuses both rings.
SPARE_RINGS = 8

HealthLookup = Callable[[str, bytes], bool]
#: service -> server ID -> (expiry on the monotonic clock, address the backend had)
Tombstones = Mapping[str, Mapping[bytes, tuple[float, Address]]]
TombstoneDict = dict[str, dict[bytes, tuple[float, Address]]]


@dataclass(frozen=True)
class RingSpec:
    """Everything a Maglev ring depends on: equal specs give byte-identical rings."""

    names: tuple[bytes, ...]  # sorted server IDs of the backends that take new flows
    key: bytes
    size: int

    def build(self) -> MaglevTable:
        return build_maglev_table(self.names, key=self.key, size=self.size)


@dataclass(frozen=True)
class TableBuilderStats:
    fallback_table_builds: int  # Maglev rings computed (the expensive part)
    ring_reuses: int  # tables assembled around a ring that was already built
    tables_built: int
    worker_restarts: int  # ring worker processes replaced after they died


def _backends(svc: ServiceConfig, unhealthy: frozenset[HealthKey]) -> list[Backend]:
    return [
        Backend(
            server_id=b.server_id,
            address=b.address,
            draining=b.state is BackendState.DRAINING,
            healthy=(svc.name, b.server_id) not in unhealthy,
        )
        for b in svc.backends
    ]


def ring_spec(cfg: LbConfig, svc: ServiceConfig, unhealthy: frozenset[HealthKey]) -> RingSpec:
    # Backend.takes_new_flows (healthy, not draining), without building the Backend objects.
    names = tuple(sorted(b.server_id for b in svc.backends
                         if b.state is not BackendState.DRAINING and (svc.name, b.server_id) not in unhealthy))
    return RingSpec(names, svc.fallback_key, cfg.lb.maglev_size)


def ring_specs(cfg: LbConfig, unhealthy: frozenset[HealthKey]) -> dict[str, RingSpec]:
    return {svc.name: ring_spec(cfg, svc, unhealthy) for svc in cfg.services}


def build_service(
    cfg: LbConfig, svc: ServiceConfig, unhealthy: frozenset[HealthKey], tombstones: Tombstones, *, now: float,
    ring: MaglevTable,
) -> ServiceTable:
    """Assemble one table around its (already built) ring: cheap, no hashing."""
    by_sid: dict[bytes, Backend] = {}
    for b in _backends(svc, unhealthy):
        if b.server_id in by_sid:
            raise ValueError(f"server ID {b.server_id.hex()} appears twice in service {svc.name!r}")
        by_sid[b.server_id] = b
    stones = {sid for sid, (expiry, _) in tombstones.get(svc.name, {}).items() if expiry > now}
    return ServiceTable(
        name=svc.name,
        vip=normalize_address(svc.vip),
        cid_configs=tuple(svc.cid_configs),
        backends=MappingProxyType(by_sid),
        tombstones=frozenset(stones) - by_sid.keys(),
        maglev=ring,
        supported_versions=frozenset(cfg.lb.supported_versions),
        short_header_fallback=cfg.lb.unroutable_short_header is UnroutableShortHeader.FALLBACK,
        retry=retry_policy(svc),
        reset_key=svc.reset_key,
    )


def retry_policy(svc: ServiceConfig) -> RetryPolicy | None:
    """The router's view of a service's retry settings; None when Retry is off."""
    if svc.retry is RetryMode.OFF or svc.retry_key is None:
        return None
    return RetryPolicy(svc.retry.value, TokenKey.from_secret(svc.retry_key), svc.retry_flood_threshold,
                       svc.newest_cid_config())


def same_routing(a: ServiceTable, b: ServiceTable) -> bool:
    """Whether swapping ``a`` for ``b`` would change no decision (then the router keeps ``a`` and its cache)."""
    return (
        a.maglev is b.maglev  # rings come from the builder's memory: equal specs give the same object
        and a.vip == b.vip
        and a.cid_configs == b.cid_configs
        and dict(a.backends) == dict(b.backends)
        and a.tombstones == b.tombstones
        and a.supported_versions == b.supported_versions
        and a.short_header_fallback == b.short_header_fallback
        and a.retry == b.retry
        and a.reset_key == b.reset_key
    )


def build_tables(
    cfg: LbConfig,
    unhealthy: frozenset[HealthKey],
    tombstones: Tombstones,
    now: float,
    rings: Mapping[RingSpec, MaglevTable] | None = None,
) -> dict[str, ServiceTable]:
    """The tables of every service: pure. ``rings`` are rings built earlier (any missing one is built here)."""
    out = {}
    for svc in cfg.services:
        spec = ring_spec(cfg, svc, unhealthy)
        ring = rings.get(spec) if rings is not None else None
        out[svc.name] = build_service(
            cfg, svc, unhealthy, tombstones, now=now, ring=ring if ring is not None else spec.build()
        )
    return out


@dataclass(frozen=True, slots=True)
class _TableInputs:
    """What one service's table is built from (the config objects by identity: a reload makes new ones)."""

    svc: ServiceConfig
    lb: LbSection  # supported versions, the unroutable-short-header setting
    unhealthy: frozenset[bytes]
    tombstones: frozenset[bytes]  # live at the build's ``now``
    ring: MaglevTable

    def same_as(self, other: _TableInputs) -> bool:
        return (self.svc is other.svc and self.lb is other.lb and self.ring is other.ring
                and self.unhealthy == other.unhealthy and self.tombstones == other.tombstones)


class TableBuilder:
    """Builds tables (keeping recent rings), remembers removed server IDs until their tombstones expire."""

    def __init__(
        self, tombstone_seconds: float = DEFAULT_TOMBSTONE_SECONDS, *, workers: Callable[[], Executor] | None = None
    ) -> None:
        self.tombstone_seconds = tombstone_seconds
        self._workers = workers  # None: rings are built inline (tests, tools)
        self.executor = workers() if workers is not None else None
        self.worker_restarts = 0
        self._tombstones: dict[str, dict[bytes, tuple[float, Address]]] = {}
        self._rings: OrderedDict[RingSpec, MaglevTable] = OrderedDict()
        self._made: dict[str, tuple[_TableInputs, ServiceTable]] = {}  # each service's last table
        self.builds = 0
        self._reuses = 0
        self._tables = 0

    # -- tombstones -----------------------------------------------------------

    def after_reload(self, old: LbConfig | None, new: LbConfig, now: float) -> TombstoneDict:
        """The tombstones once ``new`` replaces ``old``: IDs it drops are added, re-added IDs cleared."""
        out = {name: dict(stones) for name, stones in self._tombstones.items()}
        if old is not None:
            new_sids = {svc.name: {b.server_id for b in svc.backends} for svc in new.services}
            for svc in old.services:
                kept = new_sids.get(svc.name, set())
                stones = out.setdefault(svc.name, {})
                for b in svc.backends:
                    if b.server_id not in kept:
                        stones[b.server_id] = (now + self.tombstone_seconds, b.address)
        for svc in new.services:
            for b in svc.backends:
                out.get(svc.name, {}).pop(b.server_id, None)
        return out

    def set_tombstones(self, tombstones: Mapping[str, Mapping[bytes, tuple[float, Address]]]) -> None:
        self._tombstones = {name: dict(stones) for name, stones in tombstones.items()}

    def note_reload(self, old: LbConfig | None, new: LbConfig, now: float) -> None:
        """Tombstone the server IDs that ``new`` drops from ``old``; clear re-added ones."""
        self.set_tombstones(self.after_reload(old, new, now))

    def expire(self, now: float) -> bool:
        """Drop expired tombstones; True when any expired (tables need a rebuild)."""
        changed = False
        for stones in self._tombstones.values():
            for sid in [s for s, (t, _) in stones.items() if t <= now]:
                del stones[sid]
                changed = True
        return changed

    def next_expiry(self) -> float | None:
        return min((t for stones in self._tombstones.values() for t, _ in stones.values()), default=None)

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
                if stone is not None and stone[0] > now and stone[1] != b.address:
                    out.append(
                        f"service {svc.name!r}: server ID {b.server_id.hex()} was removed from "
                        f"{stone[1][0]}:{stone[1][1]} less than {self.tombstone_seconds:.0f} s ago and is now "
                        f"given to {b.address[0]}:{b.address[1]}; stale CIDs of the old backend will reach it"
                    )
        return out

    def tombstones(self, service: str) -> frozenset[bytes]:
        return frozenset(self._tombstones.get(service, {}))

    def tombstone_snapshot(self) -> Tombstones:
        return {name: dict(stones) for name, stones in self._tombstones.items()}

    # -- building -------------------------------------------------------------

    def _split(
        self, cfg: LbConfig, unhealthy: frozenset[HealthKey]
    ) -> tuple[dict[str, RingSpec], dict[RingSpec, MaglevTable], list[RingSpec]]:
        """Each service's ring spec; the rings already built, and the specs still to build."""
        specs = ring_specs(cfg, unhealthy)
        have, missing = {}, []
        for spec in dict.fromkeys(specs.values()):
            ring = self._rings.get(spec)
            if ring is None:
                missing.append(spec)
            else:
                have[spec] = ring
        return specs, have, missing

    def _assemble(self, cfg: LbConfig, unhealthy: frozenset[HealthKey], now: float, *,
                  specs: Mapping[str, RingSpec], have: Mapping[RingSpec, MaglevTable],
                  built: Mapping[RingSpec, MaglevTable], tombstones: Tombstones | None) -> dict[str, ServiceTable]:
        """``build_tables(cfg, unhealthy, tombstones, now, rings)``, reusing each service's last table
        when none of its inputs changed: a health flap of one service reassembles that service only
        (each table costs 0.1-0.3 ms of the event loop: decoders, token keys)."""
        self.builds += len(built)
        self._reuses += len(have)
        rings = {**have, **built}
        for spec, ring in rings.items():
            self._rings[spec] = ring
            self._rings.move_to_end(spec)
        while len(self._rings) > len(rings) + SPARE_RINGS:
            self._rings.popitem(last=False)  # least recently used first
        stones = self.tombstone_snapshot() if tombstones is None else tombstones
        down: dict[str, set[bytes]] = {}
        for name, sid in unhealthy:
            down.setdefault(name, set()).add(sid)
        tables, made = {}, {}
        for svc in cfg.services:
            ring = rings[specs[svc.name]]
            live = frozenset(sid for sid, (expiry, _) in stones.get(svc.name, {}).items() if expiry > now)
            inputs = _TableInputs(svc, cfg.lb, frozenset(down.get(svc.name, ())), live, ring)
            last = self._made.get(svc.name)
            if last is not None and last[0].same_as(inputs):
                table = last[1]
            else:
                table = build_service(cfg, svc, unhealthy, stones, now=now, ring=ring)
                self._tables += 1
            tables[svc.name] = table
            made[svc.name] = (inputs, table)
        self._made = made
        return tables

    def build_now(self, cfg: LbConfig, unhealthy: frozenset[HealthKey], now: float,
                  tombstones: Tombstones | None = None) -> dict[str, ServiceTable]:
        """Every table, with missing rings built on the calling thread (default tombstones: the current ones)."""
        specs, have, missing = self._split(cfg, unhealthy)
        built = {spec: spec.build() for spec in missing}
        return self._assemble(cfg, unhealthy, now, specs=specs, have=have, built=built, tombstones=tombstones)

    async def build_async(self, cfg: LbConfig, unhealthy: frozenset[HealthKey], now: float,
                          tombstones: Tombstones | None = None) -> dict[str, ServiceTable]:
        """Every table, with missing rings built in the executor: the event loop keeps forwarding meanwhile."""
        if self.executor is None:
            return self.build_now(cfg, unhealthy, now, tombstones)
        specs, have, missing = self._split(cfg, unhealthy)
        try:
            rings = await self._build_rings(self.executor, missing)
        except BrokenExecutor:
            # The worker died (the OOM killer, a stray kill): without a new one no table would ever
            # change again - no health flip, no reload. Start one and build again, once.
            assert self._workers is not None
            log.warning("ring worker died; starting a new one")
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = self._workers()
            self.worker_restarts += 1
            rings = await self._build_rings(self.executor, missing)
        built = dict(zip(missing, rings, strict=True))
        return self._assemble(cfg, unhealthy, now, specs=specs, have=have, built=built, tombstones=tombstones)

    @staticmethod
    async def _build_rings(executor: Executor, specs: list[RingSpec]) -> list[MaglevTable]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(executor, spec.build) for spec in specs))

    # Tools and tests that build one table from a health predicate (no tombstone clock involved).
    def build(self, cfg: LbConfig, healthy: HealthLookup) -> dict[str, ServiceTable]:
        unhealthy = frozenset((s.name, b.server_id) for s in cfg.services for b in s.backends
                              if not healthy(s.name, b.server_id))
        return self.build_now(cfg, unhealthy, float("-inf"))

    def build_service(self, cfg: LbConfig, svc: ServiceConfig, healthy: HealthLookup) -> ServiceTable:
        return self.build(cfg, healthy)[svc.name]

    def stats(self) -> TableBuilderStats:
        return TableBuilderStats(self.builds, self._reuses, self._tables, self.worker_restarts)
