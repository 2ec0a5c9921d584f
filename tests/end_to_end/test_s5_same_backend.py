"""S-5: the same DCIDs reach the same backend across an LB restart, a backend added and a reload.

Real ``quiclb run`` processes and plain UDP backends on loopback. 10^3
server-issued DCIDs (10^4 opt-in), each sent in a 1-RTT short header and in a
Handshake long header: every datagram must reach the backend whose server ID
its DCID carries, and keep reaching it after ``kill -9`` + restart, after a
fourth backend joins (config, process, reload), and after a reload that adds a
``cid_config`` (the first step of a key rotation). A CID that changed backend
would let its connection's packets reach a server without its state, which
would answer with a stateless reset (RFC 9000 §10.3: the reset oracle of
§21.11). The backends' reset tokens are aioquic's, random per issued CID, so
no token is derived from a key another backend or codepoint shares.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb import CidConfig, encode_cid
from quiclb_harness.admin_client import admin_request
from quiclb_harness.datagrams import long_header, short_header
from quiclb_harness.deployment import BackendSpec, CidConfigSpec
from quiclb_harness.waiting import wait_until

from .conftest import UdpCluster, make_udp_cluster

CHUNK = 100  # datagrams in flight at once: far below any socket buffer


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[UdpCluster]:
    c = make_udp_cluster(tmp_path, io="batched")
    try:
        yield c
    finally:
        c.close()


def datagrams_for(cluster: UdpCluster, count: int) -> dict[bytes, str]:
    """``count`` datagrams (short and Handshake headers) -> the server ID their DCID carries."""
    cfg = CidConfig(0, 2, 14, cluster.dep.key("echo", 0))
    rng = random.Random(5)
    out = {}
    sids = sorted(cluster.backends)
    for i in range(count // 2):
        sid = sids[i % len(sids)]
        cid = encode_cid(cfg, bytes.fromhex(sid), rng.randbytes(14))
        out[short_header(cid, payload_len=24)] = sid
        out[long_header(1, cid, rng.randbytes(8), packet_type=2, payload=b"hs")] = sid
    return out


def where_each_goes(cluster: UdpCluster, datagrams: list[bytes]) -> dict[bytes, str]:
    """Send every datagram once to the VIP, in bounded chunks; which backend received each?"""
    start = {sid: len(b.received) for sid, b in cluster.backends.items()}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        for first in range(0, len(datagrams), CHUNK):
            chunk = datagrams[first : first + CHUNK]
            for d in chunk:
                sock.sendto(d, cluster.dep.vip())
            expected = first + len(chunk)
            wait_until(lambda e=expected: sum(len(b.received) - start[s] for s, b in cluster.backends.items()) >= e,
                       timeout=10, what="the chunk at the backends")
    finally:
        sock.close()
    seen = {}
    for sid, b in cluster.backends.items():
        for r in b.received[start[sid]:]:
            assert r.payload not in seen, "a datagram reached two backends"
            seen[r.payload] = sid
    return seen


def reload(cluster: UdpCluster) -> None:
    cluster.dep.version += 1
    cluster.dep.write()
    for lb in cluster.lbs:
        if lb.alive():
            status, body = admin_request(cluster.admin(lb), "POST", "/reload", cluster.dep.token)
            assert status == 200, body[:300]


def check_same_backend(cluster: UdpCluster, count: int) -> None:
    owners = datagrams_for(cluster, count)
    datagrams = list(owners)
    lb = cluster.start_lb()
    assert where_each_goes(cluster, datagrams) == owners  # each reaches the backend its CID names

    lb.kill()  # kill -9, then a fresh process with nothing handed over
    cluster.lbs.remove(lb)
    cluster.start_lb()
    assert where_each_goes(cluster, datagrams) == owners, "moved by an LB restart"

    added = BackendSpec("0004")
    cluster.dep.services[0].backends.append(added)
    cluster.dep.write()  # allocates its port
    cluster.start_backend(added)
    reload(cluster)
    assert where_each_goes(cluster, datagrams) == owners, "moved by a backend added"

    cluster.dep.services[0].cid_configs.append(CidConfigSpec(config_id=1))
    reload(cluster)
    assert where_each_goes(cluster, datagrams) == owners, "moved by a reload (new cid_config)"


def test_s5_same_dcids_same_backend_across_restart_add_and_reload(cluster: UdpCluster) -> None:
    check_same_backend(cluster, 1_000)


@pytest.mark.optin
def test_s5_opt_in_size(cluster: UdpCluster) -> None:
    check_same_backend(cluster, 10_000)
