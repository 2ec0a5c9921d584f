"""R-19: key rotation under load, end to end (real LB, real aioquic backends and clients).

The draft's order (-21 §3.1): the new configuration goes to the LBs first, then
to the servers; connections move onto CIDs of the new configuration; the old
one is removed once nothing routes by it. Zero connections may be lost at
each step.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from backends.client import ClientError
from lb import CidConfig, decode_server_id
from quiclb_harness.admin_client import metric_sum
from quiclb_harness.deployment import CidConfigSpec
from quiclb_harness.quic_cluster import QuicCluster
from quiclb_harness.workload import EchoWorkload, close_clients, open_clients

if TYPE_CHECKING:
    from backends.client import EchoClient

CONNECTIONS = 50


def routed_by_config(cluster: QuicCluster, config_id: int) -> float:
    return metric_sum(cluster.lb_metrics(), "quiclb_cid_routed_total", config=str(config_id))


def wait_backends_reloaded(cluster: QuicCluster | QuicClusterView, before: dict[str, int],
                           timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for sid, b in cluster.backends.items():
        while b.stats()["reloads"] <= before[sid]:
            assert time.monotonic() < deadline, f"backend {sid} did not reload"
            time.sleep(0.05)


def test_r19_key_rotation_loses_no_connection(tmp_path: Path) -> None:
    cluster = QuicCluster(tmp_path)
    try:
        cluster.start()
        vip = cluster.dep.vip()
        old = CidConfig(0, 2, 14, cluster.dep.key("echo", 0))

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            clients = await open_clients(*vip, CONNECTIONS, cadata=cluster.cert_pem)
            workload = EchoWorkload(clients, interval=0.5)
            running = asyncio.ensure_future(workload.run(max_duration=60))
            try:
                # 1. The new configuration (config 1, new key, same server IDs) reaches the LBs ...
                cluster.dep.services[0].cid_configs.append(CidConfigSpec(config_id=1))
                cluster.dep.version += 1
                await loop.run_in_executor(None, cluster.dep.write)
                await loop.run_in_executor(None, cluster.reload_lbs)
                new = CidConfig(1, 2, 14, cluster.dep.key("echo", 1))
                # 2. ... then the backends, which mint with the last configuration listed.
                before = {sid: b.stats()["reloads"] for sid, b in cluster.backends.items()}
                for b in cluster.backends.values():
                    b.process.signal(signal.SIGHUP)
                await loop.run_in_executor(None, wait_backends_reloaded, cluster, before)
                # 3. Connections move: each retirement of an old CID is replaced by a new-config
                # CID, so cycling past the old spares puts every connection on config 1.
                for _ in range(9):
                    for c in clients:
                        c.change_cid()
                    await asyncio.gather(*(c.echo(b"move", timeout=3) for c in clients))
                for c in clients:
                    assert decode_server_id(new, c.dcid) is not None, "still on an old-config CID"
                    assert decode_server_id(old, c.dcid) is None
                # New connections get config-1 CIDs from the start.
                fresh = await open_clients(*vip, 5, cadata=cluster.cert_pem)
                assert all(c.dcid[0] >> 5 == 1 for c in fresh)
                await close_clients(fresh)
                # 4. Nothing routes by config 0 any more: its counter stops moving ...
                settled = await loop.run_in_executor(None, routed_by_config, cluster, 0)
                await asyncio.sleep(1.5)  # three workload periods pass with all connections echoing
                assert await loop.run_in_executor(None, routed_by_config, cluster, 0) == settled
                assert await loop.run_in_executor(None, routed_by_config, cluster, 1) > 0
                # 5. ... so config 0 is removed from the LBs and the backends.
                cluster.dep.services[0].cid_configs.pop(0)
                cluster.dep.version += 1
                await loop.run_in_executor(None, cluster.dep.write)
                await loop.run_in_executor(None, cluster.reload_lbs)
                await asyncio.sleep(1.5)  # the workload keeps echoing across the removal
            finally:
                workload.stop()
                report = await running
                await close_clients(clients)
            assert not report.lost, report.summary()
            assert workload.answered > CONNECTIONS * 4

        asyncio.run(asyncio.wait_for(scenario(), 120))
        assert all(b.stats()["unknown_cid_packets"] == 0 for b in cluster.backends.values())
    finally:
        cluster.close()


def test_r20_backend_with_a_config_the_lb_lacks_raises_the_stale_config_alert(tmp_path: Path) -> None:
    """Rolled out in the wrong order: backend 0001 mints config-1 CIDs the LBs cannot decode yet.
    The LB sees it in the backend's handshake replies and raises stale_config_alert{backend};
    once the LB has config 1 too, the alert clears and the stuck connections work."""
    cluster = QuicCluster(tmp_path)
    try:
        cluster.start()
        vip = cluster.dep.vip()
        cluster.dep.services[0].cid_configs.append(CidConfigSpec(config_id=1))
        cluster.dep.write()
        b1 = cluster.backends["0001"]
        before = {"0001": b1.stats()["reloads"]}
        b1.process.signal(signal.SIGHUP)  # the backend only: the LB still knows config 0 alone
        wait_backends_reloaded(QuicClusterView(cluster, ["0001"]), before)

        def alerts() -> dict[str, float]:
            samples = cluster.lb_metrics()
            return {sid: metric_sum(samples, "quiclb_stale_config_alert", backend=sid) for sid in cluster.server_ids}

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            # Handshakes use long headers, which the LB can route (by fallback) either way.
            # 30 fallback picks over 3 backends miss 0001 with probability (2/3)^30 < 1e-5.
            clients = await open_clients(*vip, 30, cadata=cluster.cert_pem)
            try:
                stuck = [c for c in clients if c.dcid[0] >> 5 == 1]  # those that landed on 0001
                assert stuck, "no connection landed on 0001"
                assert await loop.run_in_executor(None, alerts) == {"0001": 1, "0002": 0, "0003": 0}
                # Their short headers are unroutable at the LB: requests go unanswered ...
                with pytest.raises(ClientError):
                    await stuck[0].echo(b"lost", timeout=0.5)
                # ... until the LB learns config 1.
                await loop.run_in_executor(None, cluster.reload_lbs)
                assert await stuck[0].echo(b"works now", timeout=3) == b"works now"
                fresh: list[EchoClient] = []
                while len(fresh) < 40 and not any(c.dcid[0] >> 5 == 1 for c in fresh):  # a new one on 0001
                    fresh += await open_clients(*vip, 4, cadata=cluster.cert_pem)
                assert await loop.run_in_executor(None, alerts) == {"0001": 0, "0002": 0, "0003": 0}
                await close_clients(fresh)
            finally:
                await close_clients(clients)

        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        cluster.close()


class QuicClusterView:
    """The subset of a cluster's backends that ``wait_backends_reloaded`` should watch."""

    def __init__(self, cluster: QuicCluster, server_ids: list[str]) -> None:
        self.backends = {sid: cluster.backends[sid] for sid in server_ids}
