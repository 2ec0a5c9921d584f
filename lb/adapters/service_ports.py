"""The client side of the LB: one router and one VIP port per service, opened, moved and retired by reloads.

A router lives as long as its service: a reload that only changes a
service's backends swaps its table (``Router.set_table``); one that moves its
VIP opens a new port around the *same* router, so the service's counters
never reset; one that removes a service retires its router, whose counters
stay visible in the metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from lb.adapters.datapath import Datapath, VipPort
from lb.core.addresses import Address, normalize_address
from lb.core.outcomes import RouterStats
from lb.core.router import Router
from lb.core.service_table import ServiceTable

#: (service name, VIP) of every service of a configuration, in its order.
Services = Iterable[tuple[str, Address]]


class ServicePorts:
    """Routers and VIP ports by service name, over one :class:`~lb.adapters.datapath.Datapath`."""

    def __init__(self, datapath: Datapath) -> None:
        self.datapath = datapath
        self.routers: dict[str, Router] = {}
        self.ports: dict[str, VipPort] = {}
        self.retired: list[Router] = []

    async def open(self, services: Services, tables: Mapping[str, ServiceTable]) -> None:
        """At start: a router and a port for every service."""
        for name, vip in services:
            self.routers[name] = Router(tables[name], clock=time.time)
            self.ports[name] = await self.datapath.open_vip(name, vip, self.routers[name])

    async def prepare(self, services: Services, tables: Mapping[str, ServiceTable]) -> Callable[[], None]:
        """Phase 1 of a reload: open the ports of new and moved VIPs (on failure, close them and raise).

        Returns phase 2, which closes the ports of moved and removed services and retires removed routers.
        """
        opened: dict[str, tuple[Router, VipPort]] = {}
        try:
            for name, vip in services:
                port = self.ports.get(name)
                if port is not None and port.vip == normalize_address(vip):
                    continue
                router = self.routers.get(name) or Router(tables[name], clock=time.time)
                opened[name] = (router, await self.datapath.open_vip(name, vip, router))
        except BaseException:
            for _, port in opened.values():
                port.close()
            raise

        def commit() -> None:
            for name in [n for n in self.ports if n not in tables or n in opened]:
                self.ports.pop(name).close()
                router = self.routers.pop(name)
                if name not in tables:
                    self.retired.append(router)
            for name, (router, port) in opened.items():
                self.routers[name], self.ports[name] = router, port

        return commit

    def tables(self) -> dict[str, ServiceTable]:
        return {name: router.table for name, router in self.routers.items()}

    def stats(self) -> tuple[RouterStats, ...]:
        """Every router's counters, retired ones included (monotonic for the life of the process)."""
        return tuple(r.stats() for r in [*self.routers.values(), *self.retired])
