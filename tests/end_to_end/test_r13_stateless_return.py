"""R-13 stateless return: kill -9 and restart the LB in the middle of a server-to-client transfer.

One HTTP/3 client downloads ``GET /bytes/N`` from an aioquic backend through
the LB. Once part of the body has arrived, the LB is killed with SIGKILL and a
new LB process started from the same file; it has no per-client state to
recover (the return path reads the client address from each reply's PROXY
header). The transfer must finish, intact, on the same connection: no new
handshake anywhere (no backend accepted another connection, the new LB routed
nothing by fallback) and the rest of the body came back through the new LB.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from backends.client import EchoClient
from quiclb_harness.admin_client import metric_sum
from quiclb_harness.quic_cluster import QuicCluster

#: A datagram carries about 1.2 KB of body: this many arrive before the kill (~1 MB).
DATAGRAMS_BEFORE_KILL = 800


def connections_accepted(quic_cluster: QuicCluster) -> int:
    return sum(int(b.stats()["connections_total"]) for b in quic_cluster.backends.values())


def transfer_across_lb_kill(quic_cluster: QuicCluster, size: int, timeout: float) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with EchoClient.connect(*quic_cluster.dep.vip(), alpn="h3", cadata=quic_cluster.cert_pem) as client:
            accepted = await loop.run_in_executor(None, connections_accepted, quic_cluster)
            start = client.wire.datagrams_received
            download = asyncio.ensure_future(client.request("GET", f"/bytes/{size}", timeout=timeout))
            deadline = loop.time() + timeout
            while client.wire.datagrams_received - start < DATAGRAMS_BEFORE_KILL:  # bounded wait, no sleep-and-hope
                assert not download.done(), "the transfer ended before the LB could be killed"
                assert loop.time() < deadline, "the transfer did not start"
                await asyncio.sleep(0.001)
            lb = quic_cluster.live_lbs()[0]
            lb.signal(signal.SIGKILL)  # synchronously, mid-transfer
            killed_at = time.monotonic()
            assert not download.done()
            new_lb, _ = await loop.run_in_executor(None, quic_cluster.restart_lb, lb)
            gap = time.monotonic() - killed_at
            response = await download
            assert response.status == 200 and response.body == bytes(size), (response.status, len(response.body))
            assert client.protocol.terminated is None
            # No new handshake: the same connection carried it all.
            assert await loop.run_in_executor(None, connections_accepted, quic_cluster) == accepted
            samples = await loop.run_in_executor(None, quic_cluster.lb_metrics, new_lb)
            assert metric_sum(samples, "quiclb_fallback_routed_total") == 0  # no Initial after the restart
            assert metric_sum(samples, "quiclb_cid_routed_total") > 0  # the client's ACKs, routed by CID
            assert metric_sum(samples, "quiclb_tx_to_client_total") > 0  # the rest of the body came back here
            assert gap < 5.0

    asyncio.run(asyncio.wait_for(scenario(), timeout + 30))
    assert all(b.stats()["unknown_cid_packets"] == 0 for b in quic_cluster.backends.values())


def test_r13_transfer_survives_lb_kill_and_restart(quic_cluster: QuicCluster) -> None:
    transfer_across_lb_kill(quic_cluster, 5 * 1024 * 1024, timeout=60.0)


@pytest.mark.optin
def test_r13_transfer_survives_lb_kill_and_restart_opt_in_size(quic_cluster: QuicCluster) -> None:
    transfer_across_lb_kill(quic_cluster, 50 * 1024 * 1024, timeout=300.0)
