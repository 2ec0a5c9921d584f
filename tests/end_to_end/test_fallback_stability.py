"""Issue 13 hole 2 over real processes: a rolling reload of a CID key rotation moves no Initial.

Two ``quiclb run`` processes read the same file and share the VIP and the
inside address (``--reuse-port``: the kernel gives each client 4-tuple to one
of them). A rotation step is written to the file and only one LB reloads, as
in a rolling reload: one instance has the new ``cid_config`` set, the other
the old one. Initials from fixed client ports must reach the same plain UDP
backend as before the change, whichever instance routed them.

The deployment has no ``fallback_key_file``: the derived key is the one that
used to follow the CID keys (with the file, the key never depended on them).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from quiclb_harness.admin_client import admin_request, metric_sum, scrape
from quiclb_harness.datagrams import initial
from quiclb_harness.deployment import BackendSpec, CidConfigSpec, Deployment, ServiceSpec
from quiclb_harness.processes import ManagedProcess
from quiclb_harness.waiting import wait_until

from .conftest import UdpCluster

CLIENTS = 120  # 3 backends and 2 LBs: every LB routes some to every backend


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[UdpCluster]:
    spec = ServiceSpec(backends=[BackendSpec(f"{i:04x}") for i in range(1, 4)])
    dep = Deployment(tmp_path, [spec], fallback_key=False)
    dep.write()
    c = UdpCluster(dep)
    for b in spec.backends:
        c.start_backend(b)
    try:
        yield c
    finally:
        c.close()


def _backend_of_each_port(cluster: UdpCluster, clients: list[socket.socket], dcids: list[bytes]) -> dict[int, str]:
    """One Initial from each client socket (same 4-tuple every time); which backend got it?"""
    start = {sid: len(b.received) for sid, b in cluster.backends.items()}
    for sock, dcid in zip(clients, dcids, strict=True):
        sock.sendto(initial(1, dcid, b"\x02" * 8), cluster.dep.vip())

    def arrived() -> int:
        return sum(len(b.received) - start[sid] for sid, b in cluster.backends.items())

    wait_until(lambda: arrived() >= len(clients), timeout=10, what="every Initial at a backend")
    seen: dict[int, str] = {}
    for sid, b in cluster.backends.items():
        for r in b.received[start[sid]:]:
            seen[r.client[1]] = sid
    assert len(seen) == len(clients)
    return seen


def _fallback_routed(cluster: UdpCluster, lb: ManagedProcess) -> float:
    return metric_sum(scrape(cluster.admin(lb), cluster.dep.token), "quiclb_fallback_routed_total")


def _config_version(cluster: UdpCluster, lb: ManagedProcess) -> float:
    return metric_sum(scrape(cluster.admin(lb), cluster.dep.token), "quiclb_config_version")


def _reload(cluster: UdpCluster, lb: ManagedProcess) -> None:
    status, body = admin_request(cluster.admin(lb), "POST", "/reload", cluster.dep.token)
    assert status == 200, body[:300]


def test_two_lbs_one_reloaded_send_each_initial_to_the_same_backend(cluster: UdpCluster) -> None:
    reloaded = cluster.start_lb("--reuse-port")
    stale = cluster.start_lb("--reuse-port")
    rng = random.Random(13)
    dcids = [rng.randbytes(8) for _ in range(CLIENTS)]  # 8-byte client DCIDs, as aioquic's: fallback-routed
    clients = []
    try:
        for _ in range(CLIENTS):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            clients.append(s)
        before = _backend_of_each_port(cluster, clients, dcids)
        assert set(before.values()) == set(cluster.backends)

        svc = cluster.dep.services[0]
        for step in ("add config 1", "remove config 0"):
            if step == "add config 1":
                svc.cid_configs.append(CidConfigSpec(config_id=1))
            else:
                del svc.cid_configs[0]
            cluster.dep.version += 1
            cluster.dep.write()
            _reload(cluster, reloaded)  # the other instance keeps the configuration it started with
            assert (_config_version(cluster, reloaded), _config_version(cluster, stale)) == (cluster.dep.version, 1)
            counts = [_fallback_routed(cluster, lb) for lb in (reloaded, stale)]
            assert _backend_of_each_port(cluster, clients, dcids) == before, step
            # Both instances took part: each routed some of this round's Initials.
            after = [_fallback_routed(cluster, lb) for lb in (reloaded, stale)]
            assert all(a > c for a, c in zip(after, counts, strict=True)), (step, counts, after)
    finally:
        for s in clients:
            s.close()
