"""In-process backends behind the LB's routing core (quiclb_harness.loopback_stack), real aioquic clients, loopback.

Acceptance items exercised here (backend side): R-4 (issued CIDs route, unknown-CID
counter stays 0), R-14 (rebinding and migration survive on the same backend, with a
PATH_CHALLENGE to each new address), S-8 (backends see the real client address and
accept encapsulation only from LB addresses).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from backends.client import ClientError, EchoClient
from backends.routable_cids import active_path_address, host_cids
from backends.server import BackendServer
from backends.tls import generate_self_signed
from lb.core.addresses import canonical_host
from lb.core.cid_decoder import decode_server_id
from lb.core.encapsulation import encode_proxy_header
from quiclb_harness.loopback_stack import TEST_CID_CONFIG, LoopbackStack, loopback_stack

SIDS = (b"\x00\x01", b"\x00\x02")
#: Seconds to wait for a condition that should hold almost at once on loopback.
CONDITION_TIMEOUT = 3.0


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = CONDITION_TIMEOUT) -> None:
    """Poll ``predicate`` until true, failing after ``timeout`` seconds (bounded loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def owner_of(stack: LoopbackStack, client: EchoClient) -> BackendServer:
    sid = decode_server_id(TEST_CID_CONFIG, client.dcid)
    assert sid is not None
    return stack.backend(sid)


def server_paths(backend: BackendServer) -> list[Any]:
    return [active_path_address(p.connection) for p in backend.protocols]


def assert_routes_to(client: EchoClient, sid: bytes) -> None:
    """Every server-issued CID (handshake SCID + NEW_CONNECTION_ID) and every short-header DCID decodes."""
    wire = client.wire
    assert wire.server_cids, "no server CIDs recorded"
    assert 0 in wire.server_cids
    for seq, cid in wire.server_cids.items():
        assert decode_server_id(TEST_CID_CONFIG, cid) == sid, f"server CID seq {seq}"
    for seq, cid in wire.new_connection_id_frames.items():
        assert wire.server_cids.get(seq) == cid
        assert decode_server_id(TEST_CID_CONFIG, cid) == sid, f"NEW_CONNECTION_ID seq {seq}"
    assert wire.sent_short_dcids
    for dcid in wire.sent_short_dcids:
        assert dcid in wire.server_cids.values()
        assert decode_server_id(TEST_CID_CONFIG, dcid) == sid


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_handshake_and_echo(arun: Callable[..., Any], host: str) -> None:
    async def scenario() -> None:
        async with loopback_stack(SIDS[:1], host=host) as stack, EchoClient.connect(
            *stack.vip, cadata=stack.cadata
        ) as client:
            assert client.alpn == "quiclb-echo"
            assert await client.echo(b"hello") == b"hello"
            assert await client.echo(b"") == b""
            big = bytes(range(256)) * 800  # 200 kB, many datagrams each way
            assert await client.echo(big) == big
            backend = stack.backends[0]
            assert backend.stats.connections_open == 1
            assert backend.stats.unknown_cid_packets == 0
            assert backend.stats.datagrams_out > 0
            assert backend.stats.encap_rejected == {}

    arun(scenario())


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_r4_every_issued_cid_routes(arun: Callable[..., Any], host: str) -> None:
    """R-4 (CI size): 20 connections over 2 backends, each forced through its handshake SCID and
    the NEW_CONNECTION_ID CIDs; every CID decodes to its issuer and nothing arrives unknown."""
    rotations = 9  # past the first 7 NEW_CONNECTION_ID CIDs, into replenished ones

    async def one(stack: LoopbackStack) -> bytes:
        async with EchoClient.connect(*stack.vip, cadata=stack.cadata) as client:
            sid = decode_server_id(TEST_CID_CONFIG, client.dcid)
            assert sid in SIDS
            assert client.wire.server_cids[0] == client.dcid  # handshake SCID is in use first
            assert await client.echo(b"first") == b"first"
            for i in range(rotations):
                assert client.change_cid(), f"no spare CID at rotation {i}"
                assert await client.echo(b"r%d" % i) == b"r%d" % i
            assert len(client.wire.sent_short_dcids) == rotations + 1
            assert len(client.wire.server_cids) >= 8 + rotations
            assert_routes_to(client, sid)
            return sid

    async def scenario() -> None:
        async with loopback_stack(SIDS, host=host) as stack:
            owners = []
            for _ in range(4):  # 4 waves of 5 concurrent connections
                owners += await asyncio.gather(*(one(stack) for _ in range(5)))
            assert len(owners) == 20
            for backend in stack.backends:
                assert backend.stats.unknown_cid_packets == 0
                issued = backend.stats.issued_cids.get("0", 0)
                assert issued >= owners.count(backend.settings.server_id) * (8 + rotations)
                assert set(backend.stats.issued_cids) == {"0"}
            assert stack.lb.counters["unroutable"] == 0

    arun(scenario())


def test_s8_backend_sees_the_real_client_address(arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with loopback_stack(SIDS[:1]) as stack, EchoClient.connect(
            *stack.vip, cadata=stack.cadata
        ) as client:
            assert await client.echo(b"x") == b"x"
            backend = stack.backends[0]
            (path,) = server_paths(backend)
            assert (canonical_host(path[0]), path[1]) == client.local_address
            assert tuple(path) != stack.lb.inside

    arun(scenario())


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_r14_rebinding_and_migration_survive(arun: Callable[..., Any], host: str) -> None:
    """R-14 (CI size): 20 connections over 2 backends; each rebinds its port 5 times and moves once
    to another address (IPv4: 127.0.0.2; ::1: ports only), with an echo after each. Same backend
    throughout, a PATH_CHALLENGE to each new address, the server's active path follows the
    client, and unknown_cid_packets stays 0."""

    async def one(stack: LoopbackStack) -> None:
        # Where the route log stood when each of the client's addresses came into use: the 20
        # clients rebind concurrently, so a port may have carried another connection before.
        marks = [len(stack.lb.route_log)]
        async with EchoClient.connect(*stack.vip, cadata=stack.cadata) as client:
            assert await client.echo(b"start") == b"start"
            backend = owner_of(stack, client)
            sid = backend.settings.server_id
            total = backend.stats.connections_total

            def server_path() -> list[tuple[str, int]]:
                # The server connection that owns the client's current DCID, and its active path.
                return [
                    (canonical_host(path[0]), path[1])
                    for p in backend.protocols
                    if client.dcid in host_cids(p.connection) and (path := active_path_address(p.connection))
                ]

            moves: list[str] = ["rebind"] * 5 + ["migrate"]
            for n, move in enumerate(moves):
                challenges = client.wire.path_challenges_received
                old_dcid = client.dcid
                marks.append(len(stack.lb.route_log))
                if move == "rebind":
                    await client.rebind()
                    assert client.dcid == old_dcid  # NAT rebinding keeps the CID
                else:
                    await client.migrate("127.0.0.2" if host == "127.0.0.1" else "::1")
                    assert client.dcid != old_dcid  # active migration switches CID
                payload = b"after %s %d" % (move.encode(), n)
                assert await client.echo(payload) == payload
                await wait_until(lambda c=challenges: client.wire.path_challenges_received > c,
                                 f"PATH_CHALLENGE after {move} {n}")
                await wait_until(lambda: server_path() == [client.local_address],
                                 f"server path to follow {move} {n}")
            assert len(set(client.wire.local_addresses)) == 7
            if host == "127.0.0.1":
                assert client.local_address[0] == "127.0.0.2"
            # Same backend for every address the client used, per the LB core's routing.
            assert len(marks) == len(client.wire.local_addresses)
            for mark, address in zip(marks, client.wire.local_addresses, strict=True):
                used = {s for a, s in stack.lb.route_log[mark:] if a == (address[0], address[1])}
                assert used == {sid}, (address, used)
            assert_routes_to(client, sid)
            assert backend.stats.connections_total == total  # no new connection was made

    async def scenario() -> None:
        async with loopback_stack(SIDS, host=host) as stack:
            for _ in range(4):  # 4 waves of 5 concurrent connections
                await asyncio.gather(*(one(stack) for _ in range(5)))
            assert sum(b.stats.connections_total for b in stack.backends) == 20
            for b in stack.backends:
                assert b.stats.unknown_cid_packets == 0
            assert stack.lb.counters["unroutable"] == 0

    arun(scenario())


def test_s8_only_lb_sources_are_accepted(arun: Callable[..., Any]) -> None:
    """Datagrams from a non-LB address are dropped and counted by reason ``source``; from an
    LB address, a bad header is counted by its decoder reason and an unknown DCID as unknown."""

    async def scenario() -> None:
        extra_lb = ("127.0.0.5", 0)  # any port of 127.0.0.5 counts as an LB instance
        async with loopback_stack(SIDS[:1], options={"lb_sources": [extra_lb]}) as stack:
            backend = stack.backends[0]
            client_addr, vip = ("127.0.0.9", 5555), stack.vip
            short = b"\x40" + b"\x55" * TEST_CID_CONFIG.cid_len + b"\x00" * 40

            def send_from(host: str, payload: bytes) -> None:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.bind((host, 0))
                    sock.sendto(payload, backend.address)

            for _ in range(3):
                send_from("127.0.0.6", encode_proxy_header(client_addr, vip) + short)
            send_from("127.0.0.5", b"garbage that is not a PROXY header")
            send_from("127.0.0.5", encode_proxy_header(client_addr, vip) + short)
            await wait_until(lambda: backend.stats.datagrams_in == 5, "5 datagrams at the backend")
            assert backend.stats.encap_rejected == {"source": 3, "proxy_signature": 1}
            assert backend.stats.unknown_cid_packets == 1
            assert backend.stats.datagrams_out == 0  # nothing answered, nothing reflected
            # A real client still works through the LB.
            async with EchoClient.connect(*stack.vip, cadata=stack.cadata) as client:
                assert await client.echo(b"ok") == b"ok"
            assert backend.stats.unknown_cid_packets == 1

    arun(scenario())


def test_http3_get_post_and_404(arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with loopback_stack(SIDS[:1]) as stack, EchoClient.connect(
            *stack.vip, cadata=stack.cadata, alpn="h3"
        ) as client:
            assert client.alpn == "h3"
            page = await client.request("GET", "/")
            assert page.status == 200
            assert page.headers["content-type"].startswith("text/html")
            assert b"server_id=0001" in page.body
            assert page.headers["x-quiclb-server-id"] == "0001"
            body = b"echo me " * 2000
            echoed = await client.request("POST", "/echo", body)
            assert (echoed.status, echoed.body) == (200, body)
            assert (await client.request("GET", "/missing")).status == 404
            assert (await client.request("DELETE", "/")).status == 405
            assert stack.backends[0].stats.unknown_cid_packets == 0

    arun(scenario())


def test_unknown_alpn_is_refused(arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with loopback_stack(SIDS[:1]) as stack:
            with pytest.raises(ClientError, match=r"closed|timed out"):
                await EchoClient.open(*stack.vip, cadata=stack.cadata, alpn="nope", timeout=2.0)

    arun(scenario())


def test_verify_rejects_an_untrusted_certificate(arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with loopback_stack(SIDS[:1]) as stack:
            stranger = generate_self_signed().certificate_pem
            with pytest.raises(ClientError, match=r"closed|timed out"):
                await EchoClient.open(*stack.vip, cadata=stranger, timeout=2.0)
            async with EchoClient.connect(*stack.vip, verify=False) as client:
                assert await client.echo(b"unverified") == b"unverified"

    arun(scenario())


def test_echo_and_rebind_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with loopback_stack(SIDS) as stack, EchoClient.connect(*stack.vip, cadata=stack.cadata) as client:
            assert await client.echo(b"uv") == b"uv"
            await client.rebind()
            assert client.change_cid()
            assert await client.echo(b"uv2") == b"uv2"
            assert all(b.stats.unknown_cid_packets == 0 for b in stack.backends)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 30))
