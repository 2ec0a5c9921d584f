"""A-1: valid Initials from victims that never answer get at most 3x their bytes back, through the LB.

Each victim is a real aioquic client connection that writes its first flight
(one padded 1200-byte Initial carrying a real ClientHello) to a UDP socket and
then goes silent: nothing it receives is ever fed back, so its address never
validates (RFC 9000 §8.1). The backends answer such Initials with their
handshake flight and retransmit it on PTO; every byte that reaches the victim
over the window counts. "Then two": a victim whose connection also sends its
first PTO retransmission (a second Initial), which doubles its budget.

Each victim must receive something (the Initials are valid and the handshake
started: an undecryptable Initial gets nothing back and would pass vacuously)
and never more than 3x what it sent.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from backends.apps import ECHO_ALPN
from quiclb_harness.quic_cluster import QuicCluster


@dataclass
class Victim:
    sock: socket.socket
    sent: int = 0
    received: int = 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuicCluster]:
    c = QuicCluster(tmp_path_factory.mktemp("a1"))
    try:
        c.start()
        yield c
    finally:
        c.close()


def silent_victim(vip: tuple[str, int], initials: int) -> Victim:
    """A socket that sent a real client's first ``initials`` Initial flights and will never answer."""
    config = QuicConfiguration(is_client=True, alpn_protocols=[ECHO_ALPN], server_name="localhost",
                               verify_mode=ssl.CERT_NONE)
    conn = QuicConnection(configuration=config)
    now = time.time()
    conn.connect(vip, now=now)
    flights = [[d for d, _ in conn.datagrams_to_send(now=now)]]
    if initials == 2:  # the client's own retransmission at its first PTO (a probe Initial)
        timer = conn.get_timer()
        assert timer is not None
        conn.handle_timer(now=timer)
        flights.append([d for d, _ in conn.datagrams_to_send(now=timer)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    victim = Victim(sock)
    for flight in flights:
        assert flight and all(len(d) >= 1200 for d in flight)  # full-size Initials (RFC 9000 §14.1)
        for datagram in flight:
            sock.sendto(datagram, vip)
            victim.sent += len(datagram)
    return victim


def count_replies(victims: list[Victim], window: float) -> None:
    """Count every byte arriving at any victim until ``window`` seconds have passed (one bounded loop)."""
    by_fd = {v.sock.fileno(): v for v in victims}
    deadline = time.monotonic() + window
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select(list(by_fd), [], [], min(left, 0.2))
        for fd in readable:
            victim = by_fd[fd]
            for _ in range(64):  # drain, bounded
                try:
                    victim.received += len(victim.sock.recv(65535))
                except BlockingIOError:
                    break


def check_amplification(cluster: QuicCluster, count: int, initials: int, window: float) -> None:
    victims = [silent_victim(cluster.dep.vip(), initials) for _ in range(count)]
    try:
        count_replies(victims, window)
        silent = [v.sent for v in victims if v.received == 0]
        assert not silent, f"{len(silent)} victims got no handshake flight: the Initials were not valid"
        over = [(v.sent, v.received) for v in victims if v.received > 3 * v.sent]
        assert not over, f"amplified beyond 3x (sent, received): {over[:10]}"
    finally:
        for v in victims:
            v.sock.close()
    # Nothing was misrouted on the way (a backend that got another's datagrams would count them).
    assert all(b.stats()["unknown_cid_packets"] == 0 for b in cluster.backends.values())


@pytest.mark.parametrize("initials", [1, 2])
def test_a1_silent_clients_get_at_most_three_times_their_initials(cluster: QuicCluster, initials: int) -> None:
    # aioquic sends its whole 3x budget within about 0.6 s (three 1200-byte datagrams for one
    # Initial); 3 s also covers the retransmissions a missing limit would send (PTO doubling).
    check_amplification(cluster, count=30, initials=initials, window=3.0)


@pytest.mark.optin
@pytest.mark.parametrize("initials", [1, 2])
def test_a1_silent_clients_opt_in_size(cluster: QuicCluster, initials: int) -> None:
    check_amplification(cluster, count=1000, initials=initials, window=30.0)
