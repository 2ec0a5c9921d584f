"""Health integration in memory: probes over the datapath, flips rebuild the fallback table."""

from __future__ import annotations

import asyncio
from pathlib import Path

from quiclb_harness.datagrams import initial

from .conftest import make_deployment, start_cluster, wait_for

INTERVAL = 0.1
THRESHOLD = 2


def test_a_backend_that_stops_answering_probes_leaves_the_fallback_and_returns_after_one_answer(
    tmp_path: Path,
) -> None:
    dep = make_deployment(tmp_path, health_interval=INTERVAL, health_timeout=INTERVAL, health_threshold=THRESHOLD)

    async def main() -> None:
        cluster = await start_cluster(dep)
        try:
            silent = cluster.backends["0002"]
            await wait_for(lambda: silent.probes >= 1, what="a first probe")
            assert cluster.fallback_sids() == {"0001", "0002", "0003"}
            silent.answer_probes = False
            probes_before = silent.probes
            await wait_for(lambda: "0002" not in cluster.fallback_sids(), what="0002 leaving the fallback")
            # Down only after `threshold` unanswered probes, not at the first miss.
            assert silent.probes - probes_before >= THRESHOLD
            assert cluster.fallback_sids() == {"0001", "0003"}
            view = next(b for b in cluster.lb.snapshot().backends if b.server_id == "0002")
            assert not view.healthy and not view.in_fallback
            # New flows no longer reach it; CID routes still do (draining-like: it still serves its connections).
            client = cluster.client()
            for port_offset in range(20):
                cluster.network.bind(("127.0.0.9", 40000 + port_offset), lambda _d, _s: None).sendto(
                    initial(1, bytes(8), b""), cluster.dep.vip()
                )
            await cluster.network.settle()
            assert all(p[2][:1] != b"\xc0" for p in silent.received)
            client.send(cluster.short("0002"), cluster.dep.vip())
            await wait_for(lambda: len(client.replies) == 1, what="the CID-routed reply")

            probes_down = silent.probes
            silent.answer_probes = True
            await wait_for(lambda: silent.probes > probes_down, what="the next probe")
            await cluster.network.settle()  # its answer went back through the LB to the checker
            assert ("echo", b"\x00\x02") not in cluster.lb.health.unhealthy()  # one answer brings it back
            await wait_for(lambda: "0002" in cluster.fallback_sids(), what="0002 back in the fallback")
        finally:
            await cluster.stop()

    asyncio.run(main())


def test_a_health_flip_rebuilds_only_the_ring_that_changed(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path, health_interval=INTERVAL, health_timeout=INTERVAL, health_threshold=1)

    async def main() -> None:
        cluster = await start_cluster(dep)
        try:
            builds = cluster.lb.builder.stats().fallback_table_builds
            router = cluster.lb.routers["echo"]
            cluster.backends["0003"].answer_probes = False
            await wait_for(lambda: "0003" not in cluster.fallback_sids())
            assert cluster.lb.builder.stats().fallback_table_builds == builds + 1
            cluster.backends["0003"].answer_probes = True
            await wait_for(lambda: "0003" in cluster.fallback_sids())
            # The ring of the healthy set was kept: flapping back costs no Maglev build.
            assert cluster.lb.builder.stats().fallback_table_builds == builds + 1
            assert cluster.lb.routers["echo"] is router
        finally:
            await cluster.stop()

    asyncio.run(main())
