"""The batched Linux datapath over real loopback sockets: what leaves it, byte for byte, and what it counts.

No LB process: a MmsgDatapath with one router, plain UDP sockets as clients and
backends. Checks the zero-copy message layout (per message, the slot's PROXY v2
header with the client's address copied in, and the payload in place), the return path's header cache, and that every
datagram the adapter cannot deliver is counted (issue 8; issue 12 items 7-8).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import pytest

from lb.adapters.mmsg import LIBC, mmsg_available
from lb.adapters.mmsg_datapath import MmsgDatapath
from lb.adapters.mmsg_forward import MmsgVipPort
from lb.core.addresses import Address
from lb.core.cid_config import CidConfig
from lb.core.cid_encoder import encode_cid
from lb.core.encapsulation import decapsulate_untrusted, encode_proxy_header
from lb.core.outcomes import Outcome
from lb.core.return_path import ReturnPath
from lb.core.router import Router
from lb.core.service_table import Backend, ServiceTable, build_service_table
from quiclb_harness.datagrams import initial, short_header

pytestmark = pytest.mark.skipif(not mmsg_available(), reason="recvmmsg/sendmmsg need Linux")

CFG = CidConfig(config_id=0, server_id_len=2, nonce_len=14, key=bytes(range(16)))


def udp(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    with udp(host) as s:
        return int(s.getsockname()[1])


def table(vip: Address, backends: list[socket.socket], *, name: str = "svc") -> ServiceTable:
    return build_service_table(
        name=name, vip=vip, cid_configs=[CFG], fallback_key=bytes(32), maglev_size=1009,
        backends=[Backend(i.to_bytes(2, "big"), b.getsockname()[:2]) for i, b in enumerate(backends, start=1)],
    )


def cid_of(k: int, seed: int = 0) -> bytes:
    return encode_cid(CFG, server_id=k.to_bytes(2, "big"), nonce=seed.to_bytes(14, "big"))


class Rig(NamedTuple):
    datapath: MmsgDatapath
    return_path: ReturnPath
    router: Router
    port: MmsgVipPort
    vip: Address
    inside: Address


async def open_rig(backends: list[socket.socket], host: str = "127.0.0.1") -> Rig:
    """A batched datapath with one service ("svc") whose backends 0001.. are ``backends``."""
    vip, inside = (host, free_port(host)), (host, free_port(host))
    tbl = table(vip, backends)
    return_path = ReturnPath([tbl], own_addresses=[inside])
    datapath = MmsgDatapath()
    await datapath.open_inside(inside, return_path)
    router = Router(tbl)
    port = await datapath.open_vip("svc", vip, router)
    return Rig(datapath, return_path, router, port, vip, inside)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not met within {timeout} s")
        await asyncio.sleep(0.01)


def drain(sock: socket.socket) -> list[tuple[bytes, Address]]:
    out = []
    while True:
        try:
            data, addr = sock.recvfrom(70000)
        except BlockingIOError:
            return out
        out.append((data, addr[:2]))


@contextmanager
def sockets(*socks: socket.socket) -> Iterator[tuple[socket.socket, ...]]:
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_forward_and_return_byte_for_byte(host: str) -> None:
    async def body() -> None:
        with sockets(udp(host), udp(host), udp(host)) as (b1, b2, client):
            vip = (host, free_port(host))
            inside = (host, free_port(host))
            tbl = table(vip, [b1, b2])
            dp, rp = MmsgDatapath(), ReturnPath([tbl], own_addresses=[inside])
            await dp.open_inside(inside, rp)
            router = Router(tbl)
            await dp.open_vip("svc", vip, router)
            sizes = [1, 100, 1200, 2049, 9000, 60000]  # past the old 2 kB slots too
            sent = [short_header(cid_of(1 + i % 2, i), payload_len=s) for i, s in enumerate(sizes)]
            for d in sent:
                client.sendto(d, vip)
            got: dict[int, list[tuple[bytes, Address]]] = {1: [], 2: []}
            await until(lambda: sum(len(v) for v in got.values()) == len(sent) or bool(
                got[1].extend(drain(b1)) or got[2].extend(drain(b2))), "forwards arrive")
            me = client.getsockname()[:2]
            for k, sock in ((1, b1), (2, b2)):
                for data, source in got[k]:
                    header, payload = decapsulate_untrusted(data)
                    assert source == inside[:2] or source[0] == host
                    assert header.source == me and header.destination == vip
                    assert payload in sent
                    assert payload[1:18] == cid_of(k, sent.index(payload))  # the owner got it
                    # The backend answers through the inside port: header source = client, destination = VIP.
                    sock.sendto(encode_proxy_header(me, vip) + b"reply:" + payload[:9000], inside)  # > 2 kB too
            replies: list[tuple[bytes, Address]] = []
            await until(lambda: len(replies) == len(sent) or bool(replies.extend(drain(client))), "replies arrive")
            assert {src for _, src in replies} == {vip}
            assert sorted(r for r, _ in replies) == sorted(b"reply:" + d[:9000] for d in sent)
            stats = dp.stats()
            assert stats.rx_client_datagrams == len(sent) == router.stats().total_outcomes()
            assert sum(stats.tx_to_backend.values()) == len(sent)
            assert stats.tx_to_client == len(sent) and stats.rx_backend_datagrams == len(sent)
            assert rp.stats().tx_to_client == len(sent)
            dp.close()

    run(body)


def test_a_datagram_cut_by_its_slot_is_counted_and_the_rest_of_the_batch_forwarded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 64 KiB slots cannot cut a UDP datagram; 256-byte ones can, which shows the check and its count.
    import functools  # noqa: PLC0415

    import lb.adapters.mmsg_forward as forward  # noqa: PLC0415
    from lb.adapters.mmsg import ReceiveRing  # noqa: PLC0415

    monkeypatch.setattr(forward, "ReceiveRing", functools.partial(ReceiveRing, slot_bytes=256))

    async def body() -> None:
        with sockets(udp(), udp()) as (b1, client):
            rig = await open_rig([b1])
            asyncio.get_running_loop().remove_reader(rig.port.fd)  # one batch, driven by hand
            small, big = short_header(cid_of(1, 1), payload_len=100), short_header(cid_of(1, 2), payload_len=300)
            for d in (small, big, small):
                client.sendto(d, rig.vip)
            await asyncio.sleep(0)
            rig.port.readable()
            got: list[tuple[bytes, Address]] = []
            await until(lambda: len(got) == 2 or bool(got.extend(drain(b1))), "the two whole datagrams")
            assert [decapsulate_untrusted(d)[1] for d, _ in got] == [small, small]
            stats = rig.datapath.stats()
            assert stats.drops == {"rx_truncated": 1}
            assert stats.rx_client_datagrams == 3 == 2 + stats.drops["rx_truncated"]
            rig.datapath.close()

    run(body)


def test_reply_header_cache_never_outlives_trust() -> None:
    # The fast path remembers accepted headers per sender; a reconfigure that removes the
    # sender, or another sender with the same header bytes, must take the full checks again.
    async def body() -> None:
        with sockets(udp(), udp(), udp(), udp()) as (b1, b2, other, client):
            vip, inside = ("127.0.0.1", free_port()), ("127.0.0.1", free_port())
            tbl = table(vip, [b1, b2])
            dp, rp = MmsgDatapath(), ReturnPath([tbl], own_addresses=[inside])
            await dp.open_inside(inside, rp)
            await dp.open_vip("svc", vip, Router(tbl))
            me = client.getsockname()[:2]
            reply = encode_proxy_header(me, vip) + b"x" * 30
            for _ in range(5):
                b1.sendto(reply, inside)
            await until(lambda: rp.stats().tx_to_client == 5, "5 replies")
            other.sendto(reply, inside)  # same header bytes, not a backend
            await until(lambda: rp.stats().rejected.get("source") == 1, "stranger rejected")
            rp.reconfigure([table(vip, [b2])], own_addresses=[inside])  # b1 removed
            b1.sendto(reply, inside)
            await until(lambda: rp.stats().rejected.get("source") == 2, "removed backend rejected")
            b2.sendto(encode_proxy_header(vip, vip) + b"loop", inside)  # to the VIP itself
            await until(lambda: rp.stats().rejected.get("client_own_address") == 1, "own address rejected")
            await asyncio.sleep(0)
            assert len(drain(client)) == 5
            s = rp.stats()
            assert s.rx_backend_datagrams == dp.stats().rx_backend_datagrams == 8
            assert s.rx_backend_datagrams == s.tx_to_client + sum(s.rejected.values())
            dp.close()

    run(body)


def test_failed_forwards_are_counted_per_backend_not_as_sent() -> None:
    # Issue 12 item 8: a send the kernel refuses is backend_unreachable, never tx_to_backend.
    async def body() -> None:
        with sockets(udp(), udp()) as (b1, client):
            vip, inside = ("127.0.0.1", free_port()), ("127.0.0.1", free_port())
            backends = [Backend(b"\x00\x01", b1.getsockname()[:2]), Backend(b"\x00\x02", ("255.255.255.255", 4000)),
                        Backend(b"\x00\x03", ("::1", 4000))]  # broadcast without SO_BROADCAST; wrong family
            tbl = build_service_table(name="svc", vip=vip, cid_configs=[CFG], fallback_key=bytes(32),
                                      maglev_size=1009, backends=backends)
            dp = MmsgDatapath()
            await dp.open_inside(inside, ReturnPath([tbl], own_addresses=[inside]))
            router = Router(tbl)
            await dp.open_vip("svc", vip, router)
            for k in (1, 2, 3, 1, 2, 3):
                client.sendto(short_header(cid_of(k, k)), vip)
            client.sendto(short_header(cid_of(1), payload_len=65480), vip)  # 65498 B + a 28-byte header > 65507
            await until(lambda: dp.stats().rx_client_datagrams == 7, "all received")
            await until(lambda: len(drain(b1)) >= 0 and router.stats().total_outcomes() == 7, "all routed")
            s = dp.stats()
            assert s.tx_to_backend[("svc", "0001")] == 2
            assert s.backend_unreachable == {("svc", "0001"): 1, ("svc", "0002"): 2, ("svc", "0003"): 2}
            assert s.tx_to_backend.get(("svc", "0002"), 0) == 0 and s.tx_to_backend.get(("svc", "0003"), 0) == 0
            dp.close()

    run(body)


def test_a_full_socket_buffer_is_counted_as_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    # EAGAIN that outlasts the 1 ms wait: every datagram left in the batch is a counted drop.
    async def body() -> None:
        with sockets(udp(), udp()) as (b1, client):
            dp, _, _router, port, vip, _ = await open_rig([b1])
            # sendmmsg refuses everything with EAGAIN (a full socket buffer).
            assert LIBC is not None
            monkeypatch.setattr(LIBC, "sendmmsg", lambda fd, msgs, count, flags: -1)
            monkeypatch.setattr(type(LIBC), "errno", property(lambda self: errno.EAGAIN))
            monkeypatch.setattr("lb.adapters.mmsg_forward.wait_writable", lambda fd, seconds: False)
            for i in range(10):
                client.sendto(short_header(cid_of(1, i)), vip)
            await until(lambda: dp.stats().rx_client_datagrams == 10, "received")
            s = dp.stats()
            assert s.drops == {"tx_queue_full": 10}
            assert s.tx_to_backend[("svc", "0001")] == 0
            assert s.backend_unreachable == {}
            assert port.rx == 10
            dp.close()

    run(body)


def test_adapter_rx_equals_router_outcomes_plus_adapter_drops() -> None:
    async def body() -> None:
        with sockets(udp(), udp()) as (b1, client):
            dp, _, router, _port, vip, _ = await open_rig([b1])
            mix = [b"", b"\x00", short_header(cid_of(1)), short_header(cid_of(7)), initial(1, b"\x01" * 8, b"")]
            for i in range(200):
                client.sendto(mix[i % len(mix)], vip)
            await until(lambda: dp.stats().rx_client_datagrams == 200, "received")
            stats, rs = dp.stats(), router.stats()
            assert stats.rx_client_datagrams == rs.total_outcomes() + sum(stats.drops.values())
            assert rs.outcomes[Outcome.FALLBACK_INITIAL] == 40
            dp.close()

    run(body)


def test_a_cut_header_never_matches_a_remembered_one() -> None:
    # The receive slot still holds the previous reply's bytes past a short datagram's end: a
    # reply cut inside its (IPv6, 52-byte) header must be rejected, not matched against the cache.
    async def body() -> None:
        with sockets(udp("::1"), udp("::1")) as (b1, client):
            vip, inside = ("::1", free_port("::1")), ("::1", free_port("::1"))
            tbl = table(vip, [b1])
            rp = ReturnPath([tbl], own_addresses=[inside])
            dp = MmsgDatapath()
            await dp.open_inside(inside, rp)
            await dp.open_vip("svc", vip, Router(tbl))
            reply = encode_proxy_header(client.getsockname()[:2], vip) + b"y" * 40
            b1.sendto(reply, inside)
            await until(lambda: rp.stats().tx_to_client == 1, "first reply")
            b1.sendto(reply[:40], inside)
            await until(lambda: dp.stats().rx_backend_datagrams == 2, "cut reply received")
            assert rp.stats().rejected == {"truncated": 1}
            assert rp.stats().tx_to_client == 1
            await until(lambda: len(drain(client)) == 0, "one reply only")
            dp.close()

    run(body)


def test_a_batch_with_drops_then_a_clean_batch_each_send_their_own_slots() -> None:
    # A batch with a dropped datagram packs the later forwards to the front of the send array;
    # the next batch with no drop must send slot i as message i again, not the packed layout.
    async def body() -> None:
        with sockets(udp(), udp()) as (b1, client):
            dp, _, _router, _port, vip, _ = await open_rig([b1])
            got: list[bytes] = []
            sent: list[bytes] = []
            for rnd in range(6):
                group = [short_header(cid_of(1, 100 * rnd + k), payload_len=10 + k) for k in range(5)]
                if rnd % 2 == 0:
                    client.sendto(b"\x00garbage", vip)  # first in the batch: every later forward shifts
                for d in group:
                    client.sendto(d, vip)
                sent += group

                def arrived(want: int = len(sent)) -> bool:
                    got.extend(decapsulate_untrusted(x)[1] for x, _ in drain(b1))
                    return len(got) == want

                await until(arrived, f"round {rnd}")
            assert sorted(got) == sorted(sent)
            assert dp.stats().tx_to_backend[("svc", "0001")] == len(sent)
            dp.close()

    run(body)


def test_cached_replies_leave_whole_and_handshakes_in_them_are_still_checked() -> None:
    # The test's sends happen before the loop runs again, so each group below arrives as one
    # recvmmsg batch: the first reply warms the header cache, the next groups are all hits.
    async def body() -> None:
        with sockets(udp(), udp()) as (b1, client):
            vip, inside = ("127.0.0.1", free_port()), ("127.0.0.1", free_port())
            tbl = table(vip, [b1])
            rp = ReturnPath([tbl], own_addresses=[inside])
            flips: list[bool] = []
            rp.on_stale_change = lambda service, label, stale: flips.append(stale)
            dp = MmsgDatapath()
            await dp.open_inside(inside, rp)
            await dp.open_vip("svc", vip, Router(tbl))
            header = encode_proxy_header(client.getsockname()[:2], vip)
            b1.sendto(header + b"\x40warm", inside)
            await until(lambda: rp.stats().tx_to_client == 1, "warm-up reply")
            payloads = [bytes([0x40 | k % 0x3F]) + bytes([k]) * k for k in range(1, 31)]
            for p in payloads:
                b1.sendto(header + p, inside)
            received: list[bytes] = []
            await until(lambda: len(received) == 31 or bool(received.extend(d for d, _ in drain(client))), "batch")
            assert sorted(received) == sorted([b"\x40warm", *payloads])
            # A handshake among cached replies: its SCID is not this backend's (another key).
            other = CidConfig(config_id=0, server_id_len=2, nonce_len=14, key=bytes(range(1, 17)))
            scid = encode_cid(other, server_id=b"\x00\x01", nonce=bytes(14))
            handshake = b"\xc0\x00\x00\x00\x01\x08" + bytes(8) + bytes([len(scid)]) + scid + bytes(30)
            for p in [*payloads[:5], handshake, *payloads[5:10]]:
                b1.sendto(header + p, inside)
            await until(lambda: rp.stats().tx_to_client == 42, "second batch")
            assert flips == [True]
            assert rp.stats().stale_config == {("svc", "0001"): True}
            # The same with an empty reply in the batch: a good handshake must still clear the flag.
            good = encode_cid(CFG, server_id=b"\x00\x01", nonce=bytes(14))
            cleared = b"\xc0\x00\x00\x00\x01\x08" + bytes(8) + bytes([len(good)]) + good + bytes(30)
            for p in [b"", *payloads[:3], cleared, *payloads[3:6]]:
                b1.sendto(header + p, inside)
            await until(lambda: rp.stats().tx_to_client == 50, "third batch")
            assert flips == [True, False]
            s = rp.stats()
            assert s.tx_client_bytes == sum(len(p) for p in [b"\x40warm", *payloads, *payloads[:10], handshake,
                                                             *payloads[:6], cleared])
            dp.close()

    run(body)


def test_a_batch_of_replies_for_two_vips_leaves_from_each_vip() -> None:
    async def body() -> None:
        with sockets(udp(), udp(), udp()) as (b1, b2, client):
            vip_a, vip_b = ("127.0.0.1", free_port()), ("127.0.0.1", free_port())
            inside = ("127.0.0.1", free_port())
            ta, tb = table(vip_a, [b1], name="a"), table(vip_b, [b2], name="b")
            rp = ReturnPath([ta, tb], own_addresses=[inside])
            dp = MmsgDatapath()
            await dp.open_inside(inside, rp)
            await dp.open_vip("a", vip_a, Router(ta))
            await dp.open_vip("b", vip_b, Router(tb))
            me = client.getsockname()[:2]
            b1.sendto(encode_proxy_header(me, vip_a) + b"\x40a", inside)
            b2.sendto(encode_proxy_header(me, vip_b) + b"\x40b", inside)
            await until(lambda: rp.stats().tx_to_client == 2, "warm-up")
            for k in range(10):  # one batch, both VIPs, every header cached
                b1.sendto(encode_proxy_header(me, vip_a) + b"\x40a" + bytes([k]), inside)
                b2.sendto(encode_proxy_header(me, vip_b) + b"\x40b" + bytes([k]), inside)
            got: list[tuple[bytes, Address]] = []
            await until(lambda: len(got) == 22 or bool(got.extend(drain(client))), "replies")
            for data, source in got:
                assert source == (vip_a if data[1:2] == b"a" else vip_b), (data, source)
            dp.close()

    run(body)


def test_a_batch_of_cached_replies_takes_the_batch_path() -> None:
    # The slow path gives the same bytes, so only this shows the batch gather still finds the
    # remembered headers (a wrong offset in it would send every batch one by one).
    async def body() -> None:
        with sockets(udp(), udp()) as (b1, client):
            rig = await open_rig([b1])
            inside_port = rig.datapath._inside_port
            assert inside_port is not None
            header = encode_proxy_header(client.getsockname()[:2], rig.vip)
            b1.sendto(header + b"\x40warm", rig.inside)
            await until(lambda: rig.return_path.stats().tx_to_client == 1, "warm-up reply")
            one_by_one: list[int] = []
            slow = inside_port._queue_each
            inside_port._queue_each = lambda n, fields: (one_by_one.append(n), slow(n, fields))[1]  # type: ignore[method-assign]
            for k in range(10):
                b1.sendto(header + bytes([0x40, k]), rig.inside)
            await until(lambda: rig.return_path.stats().tx_to_client == 11, "the batch")
            assert one_by_one == []
            assert len(drain(client)) == 11
            rig.datapath.close()

    run(body)
