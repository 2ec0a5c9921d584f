"""The composition root: configuration, tables, routers, datapath, health, reload and admin wired together.

The only module that sees ``lb.core``, ``lb.adapters`` and ``lb.control`` at
once. It owns no logic of its own: the datapath glue is in
:mod:`lb.adapters.asyncio_datapath` (or the mmsg datapath), probing in
:mod:`lb.adapters.health_checker`, table builds in
:mod:`lb.control.table_builder` / :mod:`lb.control.table_updater`, the reload
transaction in :mod:`lb.control.reload`, the views in :mod:`lb.control.snapshot`.
What is here is *which* objects exist, and the two phases of a reload
(:meth:`LoadBalancer.prepare`) that touch all of them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from lb.adapters.asyncio_datapath import AsyncioDatapath, socket_opener
from lb.adapters.datapath import Datapath, VipPort
from lb.adapters.health_checker import HealthChecker, ProbeTarget
from lb.adapters.mmsg import mmsg_available
from lb.adapters.service_ports import ServicePorts
from lb.control.config import LbConfig
from lb.control.reload import ConfigReloader
from lb.control.ring_worker import ring_executor
from lb.control.snapshot import LbSnapshot, ReloadResult, gather_snapshot, route_info
from lb.control.table_builder import TableBuilder, same_routing
from lb.control.table_updater import TableUpdater
from lb.core.addresses import Address, format_address
from lb.core.health import HealthKey, HealthTracker
from lb.core.return_path import ReturnPath
from lb.core.router import Router
from lb.core.service_table import ServiceTable
from lb.errors import LbError

if TYPE_CHECKING:
    from lb.control.admin_http import AdminServer

log = logging.getLogger("quiclb")


def open_datapath(io: str) -> Datapath:
    """``asyncio``: one callback per datagram; ``batched``: recvmmsg/sendmmsg (Linux)."""
    if io == "batched":
        if not mmsg_available():
            raise LbError("--io batched needs recvmmsg/sendmmsg (Linux) and cffi")
        from lb.adapters.mmsg_datapath import MmsgDatapath  # noqa: PLC0415 - ctypes/cffi only when used

        return MmsgDatapath()
    if io != "asyncio":
        raise ValueError(f"io: must be 'asyncio' or 'batched', got {io!r}")
    return AsyncioDatapath(socket_opener())


def probe_targets(cfg: LbConfig) -> list[ProbeTarget]:
    return [ProbeTarget(s.name, b.server_id, b.address, s.vip) for s in cfg.services for b in s.backends]


class LoadBalancer:
    """One LB process. ``start`` binds and serves; ``reload`` swaps configurations atomically."""

    def __init__(self, config: LbConfig, *, admin: bool = True, io: str = "asyncio",
                 datapath: Datapath | None = None, ring_workers: Callable[[], Executor] | None = None,
                 probe_sources: Sequence[str] = ()) -> None:
        self.datapath = datapath if datapath is not None else open_datapath(io)
        self.admin_enabled = admin
        self.return_path = ReturnPath()
        self.return_path.on_stale_change = _log_stale_change
        lb = config.lb
        tracker: HealthTracker[HealthKey] = HealthTracker(lb.health_interval, lb.health_timeout, lb.health_threshold)
        self.health = HealthChecker(self.datapath, tracker, on_change=lambda _services: self.updater.request(),
                                    probe_sources=probe_sources)
        self.builder = TableBuilder(workers=ring_workers)
        self.updater = TableUpdater(self.builder, inputs=lambda: (self.config, self.health.unhealthy()),
                                    install=self._install)
        self.reloader = ConfigReloader(config, self, lock=self.updater.lock)
        self.vips = ServicePorts(self.datapath)
        self.admin: AdminServer | None = None
        self.admin_address: Address | None = None
        self.started_at = time.time()
        self._stopped = asyncio.Event()
        #: Set by :meth:`drain`: ``/healthz`` answers 503 ``draining`` so the BGP speaker withdraws.
        self.draining = False
        self._drain_task: asyncio.Task[None] | None = None

    @property
    def config(self) -> LbConfig:
        return self.reloader.config

    @property
    def routers(self) -> Mapping[str, Router]:
        return self.vips.routers

    @property
    def services(self) -> Mapping[str, VipPort]:
        return self.vips.ports

    # -- start / stop ---------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        async with self.updater.lock:
            self.health.set_targets(probe_targets(cfg), cfg.lb.health_interval, cfg.lb.health_timeout,
                                    cfg.lb.health_threshold)
            tables = await self.builder.build_async(cfg, self.health.unhealthy(), loop.time())
            await self.datapath.open_inside(cfg.lb.inside, self.return_path)
            await self.health.open_probe_ports(s.vip for s in cfg.services)
            await self.vips.open(((s.name, s.vip) for s in cfg.services), tables)
            self._install(tables)
        if cfg.lb.admin is not None and self.admin_enabled:
            await self._start_admin(cfg)
        self.health.start()
        self.reloader.mark_started()
        log.info("serving %d service(s); inside %s; config version %d digest %s",
                 len(cfg.services), format_address(cfg.lb.inside), cfg.version, cfg.digest[:16])
        if cfg.lb.fallback_key_file is None:  # lb.control.config.derive_fallback_key: stable but public
            log.warning("no lb.fallback_key_file: the fallback hash key is derived from the service name, so "
                        "clients can aim Initials at a backend; create one with `quiclb keygen -o fallback.key`")

    async def _start_admin(self, cfg: LbConfig) -> None:
        from lb.control.admin_http import AdminServer  # noqa: PLC0415 - only when configured
        from lb.control.keys import read_token_file  # noqa: PLC0415

        assert cfg.lb.admin is not None and cfg.lb.admin_token_file is not None
        admin = AdminServer(snapshot=self.snapshot, reload=self.reload, route=self.route_info,
                            token=read_token_file(cfg.lb.admin_token_file), draining=lambda: self.draining)
        self.admin_address = await admin.start(*cfg.lb.admin)
        self.admin = admin
        log.info("admin API on %s", format_address(self.admin_address))

    def install_signal_handlers(self) -> None:
        """Before ``start``: a SIGHUP during a slow start is a reload applied right after it."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
        loop.add_signal_handler(signal.SIGTERM, self._stopped.set)
        loop.add_signal_handler(signal.SIGINT, self._stopped.set)

    def request_drain(self, quiet: float, timeout: float) -> None:
        """SIGUSR1: start :meth:`drain` once (a second signal changes nothing)."""
        if self._drain_task is None:
            self.draining = True  # /healthz flips now, before the task first runs
            self._drain_task = asyncio.get_running_loop().create_task(self.drain(quiet, timeout), name="drain")

    async def drain(self, quiet: float, timeout: float, poll: float = 0.1) -> None:
        """Withdraw, wait until no datagram has reached this LB for ``quiet`` s (at most ``timeout`` s), stop.

        ``/healthz`` answers 503 ``draining`` from now on: the BGP speaker that watches it
        (``quiclb announce``) withdraws the VIP and the inside address, the routers move the
        flows to the other LBs, and the VIP and inside counters stop moving. Until then this
        LB keeps forwarding everything that reaches it, so no connection is lost.
        """
        self.draining = True
        loop = asyncio.get_running_loop()
        start = last_change = loop.time()
        log.warning("draining: /healthz answers 503; stopping after %.1f s without traffic (at most %.0f s)",
                    quiet, timeout)
        last = self._rx_counters()
        while not self._stopped.is_set():
            await asyncio.sleep(poll)
            now, current = loop.time(), self._rx_counters()
            if current != last:
                last, last_change = current, now
            if now - last_change >= quiet:
                log.warning("drained: no datagram for %.1f s (%.1f s after the drain began); stopping",
                            now - last_change, now - start)
                break
            if now - start >= timeout:
                log.warning("drain timeout: datagrams still arrived after %.0f s; stopping anyway", timeout)
                break
        self._stopped.set()

    def _rx_counters(self) -> tuple[int, int]:
        stats = self.datapath.stats()
        return stats.rx_client_datagrams, stats.rx_backend_datagrams

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self._stopped.set()
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
        await self.reloader.close()
        await self.health.close()
        await self.updater.close()
        if self.admin is not None:
            await self.admin.close()
        self.datapath.close()
        if self.builder.executor is not None:
            self.builder.executor.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    # -- tables and reload ----------------------------------------------------

    def _install(self, tables: Mapping[str, ServiceTable]) -> None:
        """Swap each router's table (one assignment; unchanged tables keep their decode cache)."""
        for name, table in tables.items():
            router = self.routers.get(name)
            if router is not None and not same_routing(router.table, table):
                router.set_table(table)
        self.return_path.reconfigure(tables.values(), own_addresses=[self.config.lb.inside])

    async def reload(self) -> ReloadResult:
        return await self.reloader.reload()

    async def prepare(self, old: LbConfig, new: LbConfig) -> Callable[[], None]:
        """Phase 1 of a reload (may fail or await; nothing visible changes): read the new admin token,
        open probe ports and the ports of new or moved VIPs, build every table. Returns phase 2."""
        now = asyncio.get_running_loop().time()
        HealthTracker(new.lb.health_interval, new.lb.health_timeout, new.lb.health_threshold)  # raises if invalid
        for warning in self.builder.reuse_warnings(new, now):
            log.warning("%s", warning)
        token = None
        if self.admin is not None and new.lb.admin_token_file is not None:
            from lb.control.keys import read_token_file  # noqa: PLC0415

            token = read_token_file(new.lb.admin_token_file)
        await self.health.open_probe_ports(s.vip for s in new.services)
        stones = self.builder.after_reload(old, new, now)
        tables = await self.builder.build_async(new, self.health.unhealthy(), now, stones)
        commit_ports = await self.vips.prepare(((s.name, s.vip) for s in new.services), tables)

        def commit() -> None:  # synchronous: no datagram or health callback interleaves
            self.health.set_targets(probe_targets(new), new.lb.health_interval, new.lb.health_timeout,
                                    new.lb.health_threshold)
            self.builder.set_tombstones(stones)
            commit_ports()
            self._install(tables)
            if token is not None:
                assert self.admin is not None
                self.admin.set_token(token)
            self.updater.arm_tombstone_expiry()

        return commit

    # -- observation ----------------------------------------------------------

    def route_info(self, service: str | None, dcid: bytes) -> dict[str, object]:
        return route_info(self.vips.tables(), service, dcid)

    def snapshot(self) -> LbSnapshot:
        health = self.health.stats()
        return gather_snapshot(
            self.config, self.vips.tables(), self.vips.stats(), returns=self.return_path.stats(),
            datapath=self.datapath.stats(), health=health.statuses, reloads=self.reloader.stats(),
            builds=self.builder.stats(), started_at=self.started_at,
            extra={"health_probes_not_sent": health.probes_not_sent,
                   "table_update_failures": self.updater.stats().failures,
                   "ring_worker_restarts": self.builder.stats().worker_restarts},
        )


def _log_stale_change(service: str, label: str, stale: bool) -> None:
    if stale:
        log.error("backend %s/%s issues CIDs that do not decode to it with the LB's configurations: its "
                  "clients' packets will be unroutable; roll the configuration out to the LBs first", service, label)
    else:
        log.warning("backend %s/%s issues routable CIDs again", service, label)


async def serve(
    config: LbConfig,
    ready: Callable[[LoadBalancer], Awaitable[None] | None] | None = None,
    *,
    admin: bool = True,
    io: str = "asyncio",
    reload_requested: Callable[[], bool] | None = None,
    probe_sources: Sequence[str] = (),
    drain: tuple[float, float] | None = None,
) -> None:
    """Run one LB process until SIGTERM/SIGINT (``admin=False``: no admin API, for extra workers).

    ``reload_requested``: whether a SIGHUP arrived before the event loop could take it (the
    CLI catches it while it loads the configuration); it is then applied right after start.
    ``probe_sources``: hosts the health probes use as their client address (one per IP
    version) instead of the VIP's. ``drain``: (quiet, timeout) seconds; SIGUSR1 then drains.
    """
    lb = LoadBalancer(config, admin=admin, io=io, ring_workers=ring_executor, probe_sources=probe_sources)
    lb.install_signal_handlers()
    if drain is not None:
        quiet, timeout = drain
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lb.request_drain, quiet, timeout)
    if reload_requested is not None and reload_requested():
        lb.reloader.request()
    try:
        await lb.start()
        if ready is not None:
            result = ready(lb)
            if asyncio.iscoroutine(result):
                await result
        await lb.wait_stopped()
    finally:
        await lb.stop()
