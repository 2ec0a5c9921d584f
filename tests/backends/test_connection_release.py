"""Issue 13 item 4: finished connections leave nothing behind in a backend.

A finished aioquic connection is a web of reference cycles (its frame-handler
table of bound methods, crypto-context partials, TLS callbacks, QuicServer's
partials on the protocol, our CID hooks). The backend's GC tuning
(``backends.cli.tune_gc``: thresholds 50000/50/1000 after ``gc.freeze()``)
makes the collector that frees cycles run rarely, and a full collection
practically never, so backends grew by about 14 KB per finished connection.
:func:`backends.routable_cids.release_connection` cuts the cycles when a
connection ends. These tests run connections of every kind the issue's soak
used (echo, HTTP/3, migrating, NAT-rebinding, clients that send one Initial and
vanish, garbage) through a real backend **with the cyclic collector disabled**:
whatever reference counting alone does not free is what the backend would keep.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aioquic.asyncio.protocol import QuicStreamHandler
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from backends.apps import ECHO_ALPN
from backends.client import EchoClient
from backends.server import BackendProtocol, BackendServer
from quiclb_harness.loopback_stack import LoopbackStack, loopback_stack

#: Connections per kind; 5 kinds + garbage. CI size: a few seconds.
PER_KIND = 40
#: Idle timeout of the backend: the vanishing clients' connections end after it.
IDLE_TIMEOUT = 1.0
SETTLE_TIMEOUT = 20.0


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """Only reference counting frees memory while the test runs (what tune_gc approximates)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@pytest.fixture
def server_connections(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[Any]]:
    """Weak references to every connection and protocol the backends create."""
    refs: list[weakref.ref[Any]] = []
    create = BackendServer._create_protocol

    def recording(self: BackendServer, connection: QuicConnection,
                  stream_handler: QuicStreamHandler | None = None) -> BackendProtocol:
        protocol = create(self, connection, stream_handler)
        refs.extend((weakref.ref(connection), weakref.ref(protocol)))
        return protocol

    monkeypatch.setattr(BackendServer, "_create_protocol", recording)
    return refs


def send_one_initial_and_vanish(vip: tuple[str, int]) -> None:
    """A valid client Initial from a socket that is closed right away (the backend idles out)."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ECHO_ALPN]))
    quic.connect(vip, now=time.monotonic())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for data, _ in quic.datagrams_to_send(now=time.monotonic()):
            sock.sendto(data, vip)


def send_garbage(vip: tuple[str, int], rng: random.Random) -> None:
    """A random short header and a full-size long header with a random DCID (undecryptable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.sendto(bytes([0x40 | rng.getrandbits(6)]) + rng.randbytes(rng.randint(20, 1300)), vip)
        initial = b"\xc0\x00\x00\x00\x01\x08" + rng.randbytes(8) + b"\x00" + rng.randbytes(1200)
        sock.sendto(initial, vip)


async def run_connections(stack: LoopbackStack, rng: random.Random) -> None:
    vip, cadata = stack.vip, stack.cadata

    async def echo(i: int) -> None:
        client = await EchoClient.open(*vip, cadata=cadata)
        assert await client.echo(b"e" * 100) == b"e" * 100
        await client.close(wait=False)

    async def http3(i: int) -> None:
        client = await EchoClient.open(*vip, cadata=cadata, alpn="h3")
        assert (await client.request("POST", "/echo", b"h" * 100)).body == b"h" * 100
        await client.close(wait=False)

    async def moving(i: int) -> None:
        client = await EchoClient.open(*vip, cadata=cadata)
        await client.echo(b"a" * 100)
        if i % 2:
            await client.migrate(f"127.0.0.{2 + i % 5}")  # new CID, new address
        else:
            await client.rebind()  # NAT rebinding: same CID, new port
        assert await client.echo(b"b" * 100) == b"b" * 100
        await client.close(wait=False)

    async def vanish(i: int) -> None:
        send_one_initial_and_vanish(vip)

    async def garbage(i: int) -> None:
        send_garbage(vip, rng)

    for kind in (echo, http3, moving, vanish, garbage):
        for start in range(0, PER_KIND, 10):  # 10 at a time, bounded by PER_KIND
            await asyncio.gather(*(kind(start + j) for j in range(10)))


async def settle(backend: BackendServer) -> None:
    """Wait (bounded) until every connection has ended and its release has run."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while backend.protocols or backend.quic_server._protocols:
        assert time.monotonic() < deadline, f"{len(backend.protocols)} connections still open"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0)  # the release is scheduled with call_soon


def test_finished_connections_are_freed_without_the_cyclic_collector(
    no_cyclic_gc: None, server_connections: list[weakref.ref[Any]],
    arun: Callable[..., Any],
) -> None:
    rng = random.Random(13)

    async def scenario() -> tuple[int, dict[str, Any]]:
        async with loopback_stack(idle_timeout=IDLE_TIMEOUT) as stack:
            backend = stack.backends[0]
            await run_connections(stack, rng)
            await settle(backend)
            sizes = {"protocols": len(backend.protocols), "cid_map": len(backend.quic_server._protocols),
                     "encap_rejected": len(backend.stats.encap_rejected),
                     "issued_cids": len(backend.stats.issued_cids)}
            return backend.stats.connections_total, sizes

    created, sizes = arun(scenario(), timeout=90)
    assert created >= 4 * PER_KIND  # echo, h3, moving, vanish (+ garbage Initials)
    assert sizes == {"protocols": 0, "cid_map": 0, "encap_rejected": 0, "issued_cids": 1}
    survivors = [r() for r in server_connections if r() is not None]
    assert not survivors, (
        f"{len(survivors)} of {len(server_connections)} server connections/protocols outlived their end "
        f"with only reference counting: {sorted({type(s).__name__ for s in survivors})}"
    )


def test_release_cuts_the_connection_off(arun: Callable[..., Any]) -> None:
    """What a released connection looks like: state gone, server callbacks inert (a late
    call from aioquic cannot resurrect CIDs in QuicServer's map)."""

    async def scenario() -> None:
        async with loopback_stack() as stack:
            backend = stack.backends[0]
            client = await EchoClient.open(*stack.vip, cadata=stack.cadata)
            protocol = next(iter(backend.protocols))
            await client.close(wait=False)
            await settle(backend)
            assert vars(protocol.connection) == {}
            protocol._connection_id_issued_handler(os.urandom(17))
            assert not backend.quic_server._protocols

    arun(scenario())
