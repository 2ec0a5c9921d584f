"""Retry offload and stateless resets through real processes (issue 9; acceptance D-4, S-9, A-4).

* Independent clients (ngtcp2's, and aioquic through :mod:`backends.client`)
  complete handshakes through an LB with ``retry = "always"``: one LB-built
  Retry per connection, and the backends accept the LB's tokens.
* D-4: tokenless 1200-byte Initials from sockets that never answer reach no
  backend (0 new connection objects) and draw at most 0.15x their bytes back.
* ``retry = "flood"``: under a flood above the threshold, clients still connect.
* Resets: a client of a backend that is killed -9 and restarted, or removed
  from the configuration, learns that its connection is gone at its next
  packet; every reset is shorter than its trigger; live connections are never
  reset.

Every process is started by the cluster and stopped by PID; every wait is on
a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.packet import pull_quic_header

from backends.client import ClientError, EchoClient
from lb import CidConfig, decode_server_id, encode_cid
from lb.core.stateless_packets import reset_token
from quiclb_harness.admin_client import metric_sum
from quiclb_harness.datagrams import initial, short_header
from quiclb_harness.quic_cluster import QuicCluster

pytestmark = pytest.mark.slow

NGTCP2 = "gtlsclient"
DEADLINE = 10.0


def wait_for(what: str, check: Callable[[], bool], timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lb_count(cluster: QuicCluster, name: str, **labels: str) -> float:
    return metric_sum(cluster.lb_metrics(), name, **labels)


def retries(cluster: QuicCluster) -> float:
    return lb_count(cluster, "quiclb_lb_originated_total", type="retry")


@pytest.fixture(scope="module")
def retry_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuicCluster]:
    c = QuicCluster(tmp_path_factory.mktemp("retry"), retry="always", reset_key=True)
    try:
        c.start()
        yield c
    finally:
        c.close()


async def connect(cluster: QuicCluster) -> EchoClient:
    host, port = cluster.dep.vip()
    return await EchoClient.open(host, port, cafile=str(cluster.dep.cert_path), timeout=5.0)


# --- clients complete handshakes through the LB's Retry -------------------------------------------


def test_ngtcp2_http3_through_retry(retry_cluster: QuicCluster, tmp_path: Path) -> None:
    if shutil.which(NGTCP2) is None:
        pytest.fail(f"{NGTCP2} is missing: `make install` installs the Debian package ngtcp2-client")
    before = retries(retry_cluster)
    host, port = retry_cluster.dep.vip()
    argv = [NGTCP2, "--exit-on-all-streams-close", "--timeout=5s", f"--download={tmp_path}", host, str(port),
            f"https://localhost:{port}/bytes/100000"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "100000").stat().st_size == 100_000
    assert "type=Retry" in out.stderr  # ngtcp2 logs the Retry it received
    assert retries(retry_cluster) - before == 1


def test_aioquic_http3_and_echo_clients_through_retry_one_retry_each(retry_cluster: QuicCluster) -> None:
    host, port = retry_cluster.dep.vip()
    before = retries(retry_cluster)
    valid_before = lb_count(retry_cluster, "quiclb_retry_tokens_total", result="valid")
    rejected_before = lb_count(retry_cluster, "quiclb_token_rejected_dropped_total")

    async def scenario() -> list[bytes]:
        out = []
        for n in range(8):  # HTTP/3 and the echo ALPN, alternately
            alpn = "h3" if n % 2 else "quiclb-echo"
            async with EchoClient.connect(host, port, cafile=str(retry_cluster.dep.cert_path), timeout=5.0,
                                          alpn=alpn) as c:
                if alpn == "h3":
                    response = await c.request("GET", f"/bytes/{1000 + n}")
                    assert response.status == 200
                    out.append(b"%d bytes" % len(response.body))
                else:
                    out.append(await c.echo(b"hello %d" % n))
        return out

    assert asyncio.run(scenario()) == [b"%d bytes" % (1000 + n) if n % 2 else b"hello %d" % n for n in range(8)]
    assert retries(retry_cluster) - before == 8
    assert lb_count(retry_cluster, "quiclb_retry_tokens_total", result="valid") - valid_before >= 8
    # No Initial of these handshakes was dropped: the later ones carry the token and the backend's CID.
    assert lb_count(retry_cluster, "quiclb_token_rejected_dropped_total") == rejected_before


# --- D-4: a flood of tokenless Initials ------------------------------------------------------------


def flood(vip: tuple[str, int], sources: int, per_source: int) -> tuple[int, list[socket.socket]]:
    """Tokenless 1200-byte Initials from ``sources`` loopback IPs that never answer; returns bytes sent."""
    socks, sent = [], 0
    for s in range(sources):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.0.{100 + s // 250}.{s % 250 + 1}", 0))
        sock.setblocking(False)
        socks.append(sock)
        for _ in range(per_source):
            datagram = initial(1, os.urandom(8), os.urandom(8))
            sock.sendto(datagram, vip)
            sent += len(datagram)
        if s % 10 == 9:
            time.sleep(0.005)  # stay under the loopback socket buffers; the LB is the one measured
    return sent, socks


def drain(socks: list[socket.socket]) -> int:
    got = 0
    for sock in socks:
        while True:
            try:
                got += len(sock.recv(65536))
            except BlockingIOError:
                break
    return got


def test_d4_tokenless_initials_reach_no_backend(retry_cluster: QuicCluster) -> None:
    opened = sum(b.stats()["connections_total"] for b in retry_cluster.backends.values())
    rx_before = lb_count(retry_cluster, "quiclb_rx_client_datagrams_total")
    bytes_before = lb_count(retry_cluster, "quiclb_lb_originated_bytes_total")
    sent, socks = flood(retry_cluster.dep.vip(), sources=100, per_source=10)
    received = 0
    try:
        wait_for("the LB to see all 1000 Initials",
                 lambda: lb_count(retry_cluster, "quiclb_rx_client_datagrams_total") - rx_before >= 1000)
        answered = lb_count(retry_cluster, "quiclb_lb_originated_bytes_total") - bytes_before

        def all_arrived() -> bool:
            nonlocal received
            received += drain(socks)
            return received >= answered

        wait_for("every byte the LB sent back to arrive", all_arrived)
    finally:
        for sock in socks:
            sock.close()
    assert sum(b.stats()["connections_total"] for b in retry_cluster.backends.values()) == opened
    assert received == answered > 0
    assert received <= 0.15 * sent, (received, sent)


def test_flood_mode_lets_clients_connect_during_a_flood(tmp_path: Path) -> None:
    cluster = QuicCluster(tmp_path, retry="flood", retry_flood_threshold=50)
    try:
        cluster.start()
        host, port = cluster.dep.vip()
        stop = threading.Event()

        def flooder() -> None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.9.1", 0))
            try:
                while not stop.is_set():  # about 500 tokenless Initials a second, 10x the threshold
                    for _ in range(10):
                        sock.sendto(initial(1, os.urandom(8), os.urandom(8)), (host, port))
                    time.sleep(0.02)
            finally:
                sock.close()

        thread = threading.Thread(target=flooder, daemon=True)
        thread.start()
        try:
            wait_for("the flood to switch Retry on", lambda: retries(cluster) > 0)

            async def clients() -> int:
                done = 0
                for _ in range(5):
                    async with EchoClient.connect(host, port, cafile=str(cluster.dep.cert_path), timeout=5.0) as c:
                        done += await c.echo(b"x") == b"x"
                return done

            assert asyncio.run(clients()) == 5
            assert lb_count(cluster, "quiclb_retry_tokens_total", result="valid") >= 5
        finally:
            stop.set()
            thread.join(timeout=5)
    finally:
        cluster.close()


# --- stateless resets ------------------------------------------------------------------------------


def serving_backend(cluster: QuicCluster, client: EchoClient) -> str:
    cfg = CidConfig(0, 2, 14, cluster.dep.key("echo", 0))
    sid = decode_server_id(cfg, client.dcid)
    assert sid is not None
    return sid.hex()


async def until_reset(client: EchoClient) -> float:
    """Send one request on a connection whose backend is gone; seconds until the client knows."""
    t0 = time.monotonic()
    with pytest.raises(ClientError):
        await client.echo(b"anyone there?", timeout=5.0)
    return time.monotonic() - t0


def test_backend_killed_and_restarted_resets_its_clients(retry_cluster: QuicCluster) -> None:
    async def scenario() -> tuple[EchoClient, str, float]:
        client = await connect(retry_cluster)
        assert await client.echo(b"before") == b"before"
        sid = serving_backend(retry_cluster, client)
        retry_cluster.backends[sid].process.kill()  # kill -9: its connections are forgotten
        retry_cluster.start_backend(sid)
        seconds = await until_reset(client)
        await client.close()
        return client, sid, seconds

    client, sid, seconds = asyncio.run(scenario())
    assert client.wire.stateless_resets == 1
    assert seconds < 1.0, seconds
    assert retry_cluster.backends[sid].stats()["resets_sent"] >= 1


def test_removed_backend_draws_resets_from_the_lb_each_smaller_than_its_trigger(tmp_path: Path) -> None:
    cluster = QuicCluster(tmp_path, reset_key=True)
    try:
        cluster.start()

        async def scenario() -> tuple[EchoClient, str, bytes, float, float]:
            client = await connect(cluster)
            assert await client.echo(b"before") == b"before"
            sid = serving_backend(cluster, client)
            cid = client.dcid
            cluster.dep.services[0].backends = [b for b in cluster.dep.services[0].backends if b.server_id != sid]
            cluster.dep.version += 1
            cluster.dep.write()
            cluster.reload_lbs()
            cluster.backends[sid].process.kill()
            before = lb_count(cluster, "quiclb_lb_originated_total", type="reset")
            seconds = await until_reset(client)
            await client.close()
            return client, sid, cid, before, seconds

        client, sid, old_cid, before, seconds = asyncio.run(scenario())
        assert client.wire.stateless_resets == 1 and seconds < 1.0, seconds
        assert lb_count(cluster, "quiclb_lb_originated_total", type="reset") > before
        # Triggers of every size from a fresh socket: resets only to those > 21 bytes, each smaller.
        key = (tmp_path / "keys" / "echo-reset.key").read_text().strip()
        token = reset_token(bytes.fromhex(key), bytes.fromhex(sid), old_cid)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.8.1", 0))
        sock.settimeout(2.0)
        try:
            for size in (19, 21, 22, 30, 43, 44, 200, 1200):
                sock.sendto(short_header(old_cid, payload_len=size - 1 - len(old_cid)), cluster.dep.vip())
                if size <= 21:
                    continue
                reset = sock.recv(2048)
                assert len(reset) < size and reset[-16:] == token and reset[0] & 0xC0 == 0x40
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(2048)  # nothing for the two short triggers (they were sent first)
        finally:
            sock.close()
    finally:
        cluster.close()


def test_live_connections_are_never_reset(retry_cluster: QuicCluster) -> None:
    """Traffic on live connections (every CID a backend issued) draws no reset from LB or backend."""
    host, port = retry_cluster.dep.vip()
    resets_before = lb_count(retry_cluster, "quiclb_lb_originated_total", type="reset")
    backend_before = sum(b.stats()["resets_sent"] for b in retry_cluster.backends.values())

    async def scenario() -> int:
        clients = [await EchoClient.open(host, port, cafile=str(retry_cluster.dep.cert_path), timeout=5.0)
                   for _ in range(10)]
        for _ in range(4):
            for c in clients:
                c.change_cid()
                assert await c.echo(b"y") == b"y"
        seen = sum(c.wire.stateless_resets for c in clients)
        for c in clients:
            await c.close()
        return seen

    assert asyncio.run(scenario()) == 0
    assert lb_count(retry_cluster, "quiclb_lb_originated_total", type="reset") == resets_before
    assert sum(b.stats()["resets_sent"] for b in retry_cluster.backends.values()) == backend_before


def test_random_cids_of_live_backends_draw_no_reset_from_the_lb(retry_cluster: QuicCluster) -> None:
    """10^4 random CIDs that decode to live backends: the LB forwards them all (only backends, which
    know their connections, may reset; the LB resets only CIDs of removed backends)."""
    cfg = CidConfig(0, 2, 14, retry_cluster.dep.key("echo", 0))
    resets_before = lb_count(retry_cluster, "quiclb_lb_originated_total", type="reset")
    routed_before = lb_count(retry_cluster, "quiclb_cid_routed_total")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.7.1", 0))
    try:
        sids = [bytes.fromhex(s) for s in retry_cluster.server_ids]
        for n in range(10_000):
            cid = encode_cid(cfg, sids[n % len(sids)], os.urandom(14))
            sock.sendto(short_header(cid, payload_len=40), retry_cluster.dep.vip())
            if n % 200 == 199:
                time.sleep(0.01)
        wait_for("10^4 CID-routed datagrams",
                 lambda: lb_count(retry_cluster, "quiclb_cid_routed_total") - routed_before >= 10_000, 30.0)
    finally:
        sock.close()
    assert lb_count(retry_cluster, "quiclb_lb_originated_total", type="reset") == resets_before


def test_s9_a_token_replayed_from_another_address_is_dropped(retry_cluster: QuicCluster) -> None:
    vip = retry_cluster.dep.vip()
    victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    victim.bind(("127.0.6.1", 0))
    thief = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    thief.bind(("127.0.6.2", 0))
    victim.settimeout(5.0)
    try:
        odcid, scid = os.urandom(8), os.urandom(8)
        victim.sendto(initial(1, odcid, scid), vip)
        retry = victim.recv(2048)
        header = pull_quic_header(Buffer(data=retry), host_cid_length=8)
        rejected = lb_count(retry_cluster, "quiclb_token_rejected_dropped_total")
        opened = sum(b.stats()["connections_total"] for b in retry_cluster.backends.values())
        thief.sendto(initial(1, header.source_cid, scid, token=header.token), vip)
        wait_for("the replay to be dropped",
                 lambda: lb_count(retry_cluster, "quiclb_token_rejected_dropped_total") == rejected + 1)
        assert sum(b.stats()["connections_total"] for b in retry_cluster.backends.values()) == opened
    finally:
        victim.close()
        thief.close()


def test_retry_over_the_asyncio_datapath(tmp_path: Path) -> None:
    cluster = QuicCluster(tmp_path, retry="always")
    try:
        cluster.start(lbs=0)
        cluster.start_lb("--io", "asyncio")
        host, port = cluster.dep.vip()

        async def scenario() -> bytes:
            async with EchoClient.connect(host, port, cafile=str(cluster.dep.cert_path), timeout=5.0) as c:
                return await c.echo(b"via asyncio")

        assert asyncio.run(scenario()) == b"via asyncio"
        assert retries(cluster) == 1
    finally:
        cluster.close()
