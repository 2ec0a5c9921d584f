"""The in-memory UDP network: asynchronous delivery, a route_packet hook, and the kernel's refusals."""

from __future__ import annotations

import asyncio
import errno

import pytest

from lb.adapters.memory_network import MAX_UDP_PAYLOAD, MemoryNetwork, Packet

A = ("127.0.0.1", 1000)
B = ("127.0.0.1", 2000)


def test_delivery_is_asynchronous_and_names_the_sender() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        got: list[tuple[bytes, tuple[str, int]]] = []
        a = net.bind(A, lambda _d, _s: None)
        net.bind(B, lambda d, s: got.append((d, s)))
        a.sendto(b"hi", B)
        assert got == []  # never inside sendto: handlers do not re-enter each other
        await net.settle()
        assert got == [(b"hi", A)]

    asyncio.run(main())


def test_route_packet_drops_duplicates_and_delays() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        got: list[bytes] = []
        a = net.bind(A, lambda _d, _s: None)
        net.bind(B, lambda d, _s: got.append(d))

        def terrible(packet: Packet) -> None:
            if packet.payload == b"drop":
                return
            if packet.payload == b"twice":
                net.deliver(packet)
            if packet.payload == b"late":
                net.deliver_later(packet, 0.05)
                return
            net.deliver(packet)

        net.route_packet = terrible
        for payload in (b"late", b"drop", b"twice", b"once"):
            a.sendto(payload, B)
        await net.settle()  # waits for the delayed one too
        assert got == [b"twice", b"twice", b"once", b"late"]

    asyncio.run(main())


def test_the_kernels_refusals_raise_and_strays_vanish() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        a = net.bind(A, lambda _d, _s: None)
        with pytest.raises(OSError) as too_big:
            a.sendto(bytes(MAX_UDP_PAYLOAD[4] + 1), B)
        assert too_big.value.errno == errno.EMSGSIZE
        with pytest.raises(OSError) as family:
            a.sendto(b"x", ("::1", 9))
        assert family.value.errno == errno.EAFNOSUPPORT
        with pytest.raises(OSError) as in_use:
            net.bind(A, lambda _d, _s: None)
        assert in_use.value.errno == errno.EADDRINUSE
        a.sendto(b"x", B)  # nobody there: no error, like unconnected UDP
        await net.settle()
        assert net.undeliverable == 1
        ephemeral = net.bind(("127.0.0.1", 0), lambda _d, _s: None)
        assert ephemeral.address[1] != 0 and net.is_bound(ephemeral.address)
        a.close()
        with pytest.raises(OSError):
            a.sendto(b"x", B)
        assert not net.is_bound(A)

    asyncio.run(main())
