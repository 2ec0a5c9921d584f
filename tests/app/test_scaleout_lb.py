"""Issue 10 inside one LB process: probes from a per-LB source address, and the drain (SIGUSR1).

Both run over the in-memory network; the namespaces test (tests/scaleout)
shows them with several LB hosts, ECMP and BGP.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from quiclb_harness.datagrams import initial

from .conftest import make_deployment, start_cluster, wait_for

PROBE_SOURCE = "127.0.0.7"


def test_probes_name_the_probe_source_not_the_vip_and_its_answers_count(tmp_path: Path) -> None:
    async def scenario() -> None:
        dep = make_deployment(tmp_path)
        cluster = await start_cluster(dep, probe_sources=(PROBE_SOURCE,))
        try:
            ports = cluster.lb.health._ports
            assert {p.address[0] for p in ports.values()} == {PROBE_SOURCE}
            await wait_for(lambda: all(b.probes >= 2 for b in cluster.backends.values()), what="probes")
            await wait_for(lambda: all(s.replies > 0 for s in cluster.lb.health.stats().statuses.values()),
                           what="probe answers at the probe source")
            assert len(cluster.lb.health.stats().statuses) == 3 and not cluster.lb.health.unhealthy()
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_drain_reports_draining_and_stops_only_after_traffic_stops(tmp_path: Path) -> None:
    async def scenario() -> None:
        dep = make_deployment(tmp_path)
        cluster = await start_cluster(dep)
        lb = cluster.lb
        client = cluster.client()
        vip = dep.vip()
        loop = asyncio.get_running_loop()
        try:
            lb.request_drain(quiet=0.3, timeout=10)
            lb.request_drain(quiet=0.3, timeout=10)  # a second SIGUSR1 changes nothing
            assert lb.draining
            # Traffic keeps arriving for a while (the routers have not withdrawn yet): no stop.
            started = loop.time()
            while loop.time() - started < 0.8:
                client.send(initial(1, b"\x01" * 8, b"\x02" * 8), vip)
                await asyncio.sleep(0.05)
                assert not lb._stopped.is_set(), "stopped while datagrams still arrived"
            silent_at = loop.time()
            await asyncio.wait_for(lb.wait_stopped(), 5)
            assert 0.3 <= loop.time() - silent_at < 2.0
        finally:
            await cluster.stop()

    asyncio.run(scenario())


def test_drain_gives_up_after_its_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        dep = make_deployment(tmp_path)
        cluster = await start_cluster(dep)
        client = cluster.client()
        loop = asyncio.get_running_loop()
        try:
            cluster.lb.request_drain(quiet=5.0, timeout=0.5)
            started = loop.time()
            while not cluster.lb._stopped.is_set():
                client.send(initial(1, b"\x01" * 8, b"\x02" * 8), dep.vip())
                await asyncio.sleep(0.05)
                assert loop.time() - started < 5, "the drain ignored its timeout"
            assert loop.time() - started >= 0.5
        finally:
            await cluster.stop()

    asyncio.run(scenario())
