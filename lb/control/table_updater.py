"""Keeps the routers' tables equal to ``build_tables(config, health, tombstones, now)``, off the event loop.

Triggers — a backend's health flips, a tombstone expires — only *request* an
update; one task builds (rings in the builder's executor, see
:mod:`lb.control.table_builder`) and installs the result with one call, and
requests arriving meanwhile are folded into one more pass. The reload
transaction takes the same :attr:`TableUpdater.lock`, so a health update built
from the old configuration can never be installed after a reload swapped in
the new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lb.control.config import LbConfig
from lb.control.table_builder import TableBuilder
from lb.core.health import HealthKey
from lb.core.service_table import ServiceTable

log = logging.getLogger("quiclb")

@dataclass(frozen=True)
class TableUpdaterStats:
    updates: int  # table sets installed after a health flip or a tombstone expiry
    failures: int  # builds that raised (the old tables kept routing)


Inputs = Callable[[], tuple[LbConfig, frozenset[HealthKey]]]
Install = Callable[[Mapping[str, ServiceTable]], None]


class TableUpdater:
    """Rebuilds on request, one pass at a time; arms a timer for the next tombstone expiry."""

    def __init__(self, builder: TableBuilder, *, inputs: Inputs, install: Install) -> None:
        self.builder = builder
        self._inputs = inputs
        self._install = install
        self.lock = asyncio.Lock()
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.updates = 0
        self.failures = 0

    def request(self) -> None:
        """Schedule a rebuild from the current inputs (cheap; called from datagram callbacks)."""
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="table-update")

    async def _run(self) -> None:
        while self._dirty:
            self._dirty = False
            async with self.lock:
                config, unhealthy = self._inputs()
                try:
                    tables = await self.builder.build_async(config, unhealthy, asyncio.get_running_loop().time())
                except Exception as exc:  # a bug, not an input error: keep routing with the old tables
                    self.failures += 1
                    log.error("table update failed, keeping the current tables: %s: %s", type(exc).__name__, exc)
                    continue
                self._install(tables)
                self.updates += 1

    async def idle(self) -> None:
        """Wait until no update is pending or running (tests, and shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    def arm_tombstone_expiry(self) -> None:
        """(Re)arm the timer that rebuilds when the earliest tombstone expires (same clock as the health checker)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        expiry = self.builder.next_expiry()
        if expiry is not None:
            self._timer = asyncio.get_running_loop().call_at(expiry, self._expire)

    def _expire(self) -> None:
        self._timer = None
        # call_at may fire up to one clock resolution early: do not re-arm for the same instant.
        if self.builder.expire(asyncio.get_running_loop().time() + 0.001):
            self.request()
        self.arm_tombstone_expiry()

    def stats(self) -> TableUpdaterStats:
        return TableUpdaterStats(self.updates, self.failures)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
