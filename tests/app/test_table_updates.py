"""Table updates off the loop: serialized with reloads, and tombstones expire on the loop's clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lb.adapters.asyncio_datapath import AsyncioDatapath
from lb.adapters.memory_network import MemoryNetwork
from lb.app import LoadBalancer
from lb.control.config import load_config
from quiclb_harness.deployment import BackendSpec

from .conftest import MemoryCluster, make_deployment, start_cluster, wait_for


class GatedExecutor(ThreadPoolExecutor):
    """Ring builds wait for ``gate``: a test holds a build in flight while other things happen."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def gated() -> Any:
            self.waiting += 1
            self.gate.wait()
            return fn(*args, **kwargs)

        return super().submit(gated)


def test_a_health_flip_during_a_reload_is_applied_to_the_new_configuration(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path, health_interval=0.1, health_timeout=0.1, health_threshold=1)

    async def main() -> None:
        executor = GatedExecutor()
        network = MemoryNetwork()
        lb = LoadBalancer(load_config(dep.path), admin=False, datapath=AsyncioDatapath(network.open_endpoint),
                          ring_workers=lambda: executor)
        cluster = MemoryCluster(dep, network, lb, {})
        for spec in dep.services[0].backends:
            cluster.add_backend(spec)
        await lb.start()
        try:
            spec = BackendSpec("0004")
            dep.services[0].backends.append(spec)
            dep.write()
            cluster.add_backend(spec)
            executor.gate.clear()
            waiting = executor.waiting
            reload = asyncio.create_task(lb.reload())
            await wait_for(lambda: executor.waiting > waiting, what="the reload's build in flight")
            cluster.backends["0001"].answer_probes = False
            await wait_for(lambda: ("echo", b"\x00\x01") in lb.health.unhealthy(), what="0001 down")
            executor.gate.set()
            assert (await reload).ok
            await lb.updater.idle()
            assert cluster.fallback_sids() == {"0002", "0003", "0004"}
        finally:
            executor.gate.set()
            await lb.stop()

    asyncio.run(main())


def test_a_tombstone_expires_on_the_loop_clock_without_a_ring_build(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = await start_cluster(make_deployment(tmp_path))
        try:
            cluster.lb.builder.tombstone_seconds = 0.2
            cluster.dep.services[0].backends.pop()  # 0003
            assert await cluster.reload()
            assert cluster.lb.routers["echo"].table.tombstones == {b"\x00\x03"}
            builds = cluster.lb.builder.stats().fallback_table_builds
            await wait_for(lambda: not cluster.lb.routers["echo"].table.tombstones, what="the tombstone expiry")
            assert cluster.lb.builder.stats().fallback_table_builds == builds
            assert [b.state for b in cluster.lb.snapshot().backends] == ["active", "active"]
        finally:
            await cluster.stop()

    asyncio.run(main())
