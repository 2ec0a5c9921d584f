"""R-18: handshakes in flight while the LB scales out from N to N+1 backends.

Real ``quiclb run`` and aioquic backend processes; the clients are aioquic
``QuicConnection`` objects driven by hand here, so the test decides exactly
where each handshake stands when the LB reloads with a fourth backend:

* *answered*: the client sent its Initial and the backend's answer is waiting
  in the client's socket, unread, when the LB reloads; the client then
  continues with the backend's CID - those packets must stay on that backend;
* *lost*: everything the backend sends is lost (discarded) until the client
  retransmits its Initial, with the same client-chosen DCID and 4-tuple, under
  the new table: about 1/(N+1) of these now hash to the new backend, while the
  first backend holds half a handshake and may still retransmit its answer.

Pass (acceptance R-18): failures <= 1/(N+1) x share in flight + 0.01; every
failed handshake succeeds on retry; the answered ones never moved; the lost
ones did reach the new backend (the test saw the remap).
"""

from __future__ import annotations

import asyncio
import select
import socket
import time

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, StreamDataReceived

from backends.apps import ECHO_ALPN
from backends.client import EchoClient
from backends.routable_cids import current_peer_cid
from lb import CidConfig, decode_server_id
from quiclb_harness.admin_client import admin_request
from quiclb_harness.deployment import BackendSpec
from quiclb_harness.quic_cluster import QuicCluster
from quiclb_harness.waiting import wait_until

NEW_BACKEND = "0004"
ECHO = b"R-18 echo"


class Handshake:
    """One client connection over its own UDP socket, advanced only when the test says so."""

    def __init__(self, vip: tuple[str, int], cadata: bytes) -> None:
        config = QuicConfiguration(is_client=True, alpn_protocols=[ECHO_ALPN], server_name="localhost")
        config.load_verify_locations(cadata=cadata)
        self.conn = QuicConnection(configuration=config)
        self.vip = vip
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.result: str | None = None  # "ok" (handshake done, echo answered) or why not
        self.echo_stream: int | None = None
        self.echoed = bytearray()
        #: The path loses every server datagram until this client sends again (its PTO retransmission).
        self.deaf = False
        self.conn.connect(vip, now=time.monotonic())
        self.flush()

    def flush(self) -> int:
        sent = 0
        for data, _ in self.conn.datagrams_to_send(now=time.monotonic()):
            self.sock.sendto(data, self.vip)
            sent += 1
        return sent

    def pending(self) -> bool:
        try:
            self.sock.recv(65535, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        return True

    def discard_received(self) -> None:
        while self.pending():
            self.sock.recv(65535)

    def step(self) -> None:
        """Read what arrived, fire a due timer, send what the connection wants to send."""
        now = time.monotonic()
        for _ in range(64):  # bounded drain
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                break
            if not self.deaf:
                self.conn.receive_datagram(data, self.vip, now=now)
        timer = self.conn.get_timer()
        if timer is not None and timer <= now:
            self.conn.handle_timer(now=now)
        while (event := self.conn.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                # The client's side is done once it sent its Finished; the proof that the *server*
                # got it (a backend that lost the handshake never would) is an echo round trip.
                self.echo_stream = self.conn.get_next_available_stream_id()
                self.conn.send_stream_data(self.echo_stream, ECHO, end_stream=True)
            elif isinstance(event, StreamDataReceived) and event.stream_id == self.echo_stream:
                self.echoed += event.data
                if event.end_stream:
                    self.result = "ok" if self.echoed == ECHO else f"echo came back as {bytes(self.echoed)!r}"
            elif isinstance(event, ConnectionTerminated) and self.result is None:
                self.result = f"closed: {event.reason_phrase!r}"
        if self.flush() and self.deaf:
            self.deaf = False  # retransmitted: from now on the path works

    def server_id(self, cfg: CidConfig) -> str:
        sid = decode_server_id(cfg, current_peer_cid(self.conn))
        return sid.hex() if sid else "?"


def drive(handshakes: list[Handshake], timeout: float) -> None:
    """Advance every unfinished handshake until all are done or ``timeout`` passes (one bounded loop)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        waiting = [h for h in handshakes if h.result is None]
        if not waiting:
            return
        timers = [t for h in waiting if (t := h.conn.get_timer()) is not None]
        wait = min([left, 0.05, *(max(0.0, t - time.monotonic()) for t in timers)])
        select.select([h.sock for h in waiting], [], [], wait)
        for h in waiting:
            h.step()
    for h in handshakes:
        if h.result is None:
            h.result = f"not done within {timeout} s"


def scale_out_mid_handshake(quic_cluster: QuicCluster, count: int) -> None:
    vip, cfg = quic_cluster.dep.vip(), CidConfig(0, 2, 14, quic_cluster.dep.key("echo", 0))
    n = len(quic_cluster.server_ids)
    # The new backend runs (and is in the file) before the LB learns of it, as an operator scales out.
    quic_cluster.dep.services[0].backends.append(BackendSpec(NEW_BACKEND, host=quic_cluster.host))
    quic_cluster.dep.version += 1
    quic_cluster.dep.write()
    quic_cluster.start_backend(NEW_BACKEND)

    answered = [Handshake(vip, quic_cluster.cert_pem) for _ in range(count // 2)]
    lost = [Handshake(vip, quic_cluster.cert_pem) for _ in range(count - count // 2)]
    everyone = answered + lost
    wait_until(lambda: all(h.pending() for h in everyone), timeout=10, what="every backend's first answer")
    for h in lost:
        h.deaf = True
        h.discard_received()
    status, body = admin_request(quic_cluster.admin(), "POST", "/reload", quic_cluster.dep.token)  # N -> N+1
    assert status == 200, body[:300]
    drive(everyone, timeout=10.0)

    failed = [h for h in everyone if h.result != "ok"]
    in_flight_share = 1.0  # every handshake was between its first Initial and its completion
    assert len(failed) / count <= in_flight_share / (n + 1) + 0.01, [h.result for h in failed][:10]
    # Past its first answer a handshake is CID-routed: none may fail or move, whatever the table does.
    assert [h.result for h in answered] == ["ok"] * len(answered), [h.result for h in answered if h.result != "ok"]
    assert NEW_BACKEND not in {h.server_id(cfg) for h in answered}
    moved_lost = [h for h in lost if h.result == "ok" and h.server_id(cfg) == NEW_BACKEND]
    assert moved_lost, "no retransmitted Initial was remapped to the new backend"  # (3/4)^50 < 1e-6 by chance

    async def retry() -> None:
        for _ in failed:
            async with EchoClient.connect(*vip, cadata=quic_cluster.cert_pem, timeout=5.0) as client:
                assert await client.echo(b"retry", timeout=5.0) == b"retry"

    asyncio.run(retry())
    for h in everyone:
        h.sock.close()
    assert all(b.stats()["unknown_cid_packets"] == 0 for b in quic_cluster.backends.values())


def test_r18_handshakes_survive_scale_out_mid_handshake(quic_cluster: QuicCluster) -> None:
    scale_out_mid_handshake(quic_cluster, 100)


@pytest.mark.optin
def test_r18_opt_in_size(quic_cluster: QuicCluster) -> None:
    scale_out_mid_handshake(quic_cluster, 500)
