"""Malformed HTTP at a running LB's admin port: clean refusals, and the datapath never waits (issue 11).

One real ``quiclb run`` process with plain UDP backends. For a few seconds, at
once: fuzzing workers send malformed requests (bad request lines, huge and
numerous headers, binary garbage, slow heads and slow bodies), slow clients
drip one byte per second, a prober asks ``/healthz``, and a UDP client sends
CID-routed datagrams through the VIP. The admin API shares the LB's event
loop with the datapath, so a handler that blocked would show up as a late or
missing UDP reply.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

from lb import CidConfig, encode_cid
from quiclb_harness.datagrams import short_header
from quiclb_harness.udp_backend import REPLY_PREFIX

from .conftest import UdpCluster, make_udp_cluster

#: How long the hostile traffic runs.
DURATION = 5.0
#: Bound on one admin exchange: the LB's read deadline (5 s) plus its lingering close (1 s) and slack.
ADMIN_WAIT = 8.0
#: Every UDP datagram must come back within this, fuzz or not (about 50 ms on the 2-core reference machine).
UDP_BOUND = 0.25
HEALTHZ_BOUND = 1.0

Addr = tuple[str, int]


def fuzz_request(rng: random.Random, token: str) -> tuple[bytes, float]:
    """One malformed (or occasionally valid) request, and the pause between its bytes (0: one write)."""
    valid = f"GET /backends HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    kind = rng.randrange(11)
    if kind == 0:  # binary garbage
        return rng.randbytes(rng.randrange(1, 4096)), 0.0
    if kind == 1:  # flipped, inserted and deleted bytes in a valid request
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 8)):
            pos = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[pos] = rng.randrange(256)
            elif op == 1:
                data.insert(pos, rng.choice(b" \t\r\n\x00:/%?#\x7f\xff"))
            elif len(data) > 1:
                del data[pos]
        return bytes(data), 0.0
    if kind == 2:  # a huge header
        return b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * rng.randrange(8_000, 200_000) + b"\r\n\r\n", 0.0
    if kind == 3:  # many headers
        count = rng.randrange(60, 2_000)
        return b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-N: 1\r\n" * count + b"\r\n", 0.0
    if kind == 4:  # a bad request line
        line = rng.choice([b"GET", b"GET /", b"/ HTTP/1.1", b"GET / HTTP/9.9", b"GET / FTP/1.0", b"G\x00T / HTTP/1.1",
                           b"GET /" + b"a" * 20_000 + b" HTTP/1.1", b"GET http://evil/ HTTP/1.1", b"\r\n\r\n\r\n"])
        return line + b"\r\nHost: x\r\n\r\n", 0.0
    if kind == 5:  # a body longer than allowed, or a lying Content-Length
        length = rng.choice([0, 5, 1025, 10**9, 2**70])
        return f"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode() + b"x" * 10, 0.0
    if kind == 6:  # chunked body, smuggling-style headers
        return (b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), 0.0
    if kind == 7:  # a slow head
        return b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: a\r\n" * 4, 0.3
    if kind == 9:  # arbitrary bytes where the token goes
        junk = rng.randbytes(rng.randrange(1, 64)).replace(b"\r", b"").replace(b"\n", b"")
        return b"GET /config HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + junk + b"\r\n\r\n", 0.0
    if kind == 8:  # a slow body
        return (f"POST /reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                "Content-Length: 40\r\n\r\n").encode() + b"y" * 40, 0.25
    return valid, 0.0


def check_answer(data: bytes) -> int:
    """The status of a clean answer (0 for a closed connection); fails on anything else."""
    if not data:
        return 0
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data[:200]
    status_line, *fields = head.split(b"\r\n")
    version, status_text, *_ = status_line.split(b" ", 2)
    assert version in (b"HTTP/1.1", b"HTTP/1.0"), status_line
    status = int(status_text)
    lengths = [int(f.split(b":", 1)[1]) for f in fields if f.lower().startswith(b"content-length:")]
    assert lengths == [len(body)], head
    # Refusals are 4xx; 501 is the one protocol refusal (chunked bodies); 200 only for an intact request.
    assert status in (200, 501) or 400 <= status < 500, status_line
    return status


async def exchange(addr: Addr, data: bytes, pause: float) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)

    async def read_all() -> bytes:
        chunks = []
        while chunk := await reader.read(65536):
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        async with asyncio.timeout(ADMIN_WAIT):
            answer = asyncio.create_task(read_all())
            if pause:  # dribble, until the server answers or closes
                for i in range(0, len(data), 4):
                    if answer.done():
                        break
                    writer.write(data[i : i + 4])
                    await asyncio.wait([answer], timeout=pause)
            else:
                writer.write(data)
            try:
                await writer.drain()
            except ConnectionError:
                pass
            return await answer
    except ConnectionError:
        return b""  # reset after a refusal: as good as a close
    except TimeoutError:
        raise AssertionError(f"no answer nor close within {ADMIN_WAIT} s to {data[:160]!r} (pause {pause})") from None
    finally:
        writer.close()


async def fuzzer(addr: Addr, token: str, seed: int, stop: asyncio.Event, statuses: list[int]) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        data, pause = fuzz_request(rng, token)
        statuses.append(check_answer(await exchange(addr, data, pause)))


async def slow_client(addr: Addr, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(*addr)
        except OSError:
            await asyncio.sleep(1.0)
            continue
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100:
                writer.write(bytes([byte]))
                try:
                    if await asyncio.wait_for(reader.read(1024), 1.0) is not None:
                        break  # answered (408) or closed
                except TimeoutError:
                    if stop.is_set():
                        break
        except ConnectionError:
            pass
        finally:
            writer.close()
        await asyncio.sleep(1.0)  # a slow client, not a connect flood (that is a firewall's job)


async def prober(addr: Addr, stop: asyncio.Event, took: list[float]) -> None:
    while not stop.is_set():
        start = time.monotonic()
        data = await exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 0.0)
        assert data.startswith(b"HTTP/1.1 200 "), data[:100]
        took.append(time.monotonic() - start)
        await asyncio.sleep(0.2)


class _UdpPinger(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.sent: dict[bytes, float] = {}
        self.rtts: list[float] = []

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        assert data.startswith(REPLY_PREFIX), data[:40]
        payload = data.split(b":", 2)[2]
        sent = self.sent.pop(payload, None)
        if sent is not None:
            self.rtts.append(time.monotonic() - sent)


async def udp_pings(cluster: UdpCluster, stop: asyncio.Event, pinger: _UdpPinger) -> None:
    cfg = CidConfig(0, 2, 14, cluster.dep.key("echo", 0))
    sids = sorted(cluster.backends)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: pinger, local_addr=("127.0.0.1", 0)
    )
    try:
        i = 0
        while not stop.is_set():
            datagram = short_header(encode_cid(cfg, bytes.fromhex(sids[i % len(sids)]), os.urandom(14)), 40)
            pinger.sent[datagram] = time.monotonic()
            transport.sendto(datagram, cluster.dep.vip())
            i += 1
            await asyncio.sleep(0.02)
        # The last replies: wait on the condition, bounded.
        async with asyncio.timeout(UDP_BOUND):
            while pinger.sent:
                await asyncio.sleep(0.01)
    finally:
        transport.close()


def test_malformed_admin_requests_get_clean_refusals_and_never_stall_forwarding(tmp_path: Path) -> None:
    cluster = make_udp_cluster(tmp_path, n=2)
    try:
        lb = cluster.start_lb()
        admin = cluster.admin(lb)
        token = cluster.dep.token
        statuses: list[int] = []
        healthz_took: list[float] = []
        pinger = _UdpPinger()

        async def scenario() -> None:
            stop = asyncio.Event()
            tasks = [
                *(asyncio.create_task(fuzzer(admin, token, seed, stop, statuses)) for seed in range(6)),
                *(asyncio.create_task(slow_client(admin, stop)) for _ in range(50)),
                asyncio.create_task(prober(admin, stop, healthz_took)),
            ]
            pings = asyncio.create_task(udp_pings(cluster, stop, pinger))
            await asyncio.sleep(DURATION)  # the length of the storm, not a wait for a condition
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, pings), ADMIN_WAIT + 2)

        asyncio.run(scenario())
        assert lb.alive()
        assert len(statuses) >= 20, statuses
        assert {0, 400, 431}.issubset(set(statuses)), sorted(set(statuses))
        assert pinger.sent == {}, f"{len(pinger.sent)} datagrams never came back"
        assert len(pinger.rtts) >= DURATION / 0.02 / 2
        assert max(pinger.rtts) < UDP_BOUND, max(pinger.rtts)
        assert len(healthz_took) >= 10 and max(healthz_took) < HEALTHZ_BOUND, healthz_took
    finally:
        cluster.close()
