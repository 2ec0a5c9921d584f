"""A plain UDP backend for LB tests: decodes the PROXY v2 header, records, answers through the LB.

No QUIC: it lets tests check the datapath (who received what, with which
client address) without aioquic's cost. Runs in a thread with a blocking
socket and a short poll timeout so ``close`` is prompt.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

from lb.core.addresses import ip_version
from lb.core.encapsulation import decapsulate_untrusted, encode_proxy_header
from lb.core.quic_constants import is_reserved_version
from lb.core.quic_header import parse_routing_fields_untrusted
from lb.errors import MalformedDatagram
from quiclb_harness.datagrams import version_negotiation

REPLY_PREFIX = b"reply-from:"


def _version_negotiation_for(payload: bytes) -> bytes | None:
    """A VN reply (CIDs swapped, RFC 8999 §6) for a long header of a greased version, else None."""
    try:
        fields = parse_routing_fields_untrusted(payload)
    except MalformedDatagram:
        return None
    if fields.version is None or not is_reserved_version(fields.version) or fields.scid is None:
        return None
    return version_negotiation(fields.scid, fields.dcid, [1])


@dataclass(frozen=True)
class Received:
    client: tuple[str, int]
    vip: tuple[str, int]
    payload: bytes
    lb_source: tuple[str, int]


class UdpTestBackend:
    """Records every decapsulated datagram; replies ``REPLY_PREFIX + server_id + b":" + payload``.

    Replies go to the LB's inside address (``via-lb``) with source = client and
    destination = VIP in the header, exactly as an aioquic backend would.
    """

    def __init__(self, address: tuple[str, int], server_id: str, lb_inside: tuple[str, int], *,
                 reply: bool = True) -> None:
        family = socket.AF_INET6 if ip_version(address[0]) == 6 else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.address = address
        self.server_id = server_id
        self.lb_inside = lb_inside
        self.reply = reply
        self.received: list[Received] = []
        self.malformed = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"udp-backend-{server_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, src = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                header, payload = decapsulate_untrusted(data)
            except MalformedDatagram:
                with self._cond:
                    self.malformed += 1
                    self._cond.notify_all()
                continue
            vn = _version_negotiation_for(payload)
            if vn is not None:  # the LB's health probe: answer like a QUIC server would
                body = vn
            else:
                with self._cond:
                    self.received.append(Received(header.source, header.destination, payload, src[:2]))
                    self._cond.notify_all()
                if not self.reply:
                    continue
                body = REPLY_PREFIX + self.server_id.encode() + b":" + payload
            if self.reply:
                try:
                    self.sock.sendto(encode_proxy_header(header.source, header.destination) + body, self.lb_inside)
                except OSError:
                    pass

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Block until at least ``count`` datagrams arrived; returns them all (raises on timeout)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.received) >= count, timeout):
                raise TimeoutError(f"backend {self.server_id}: {len(self.received)} of {count} datagrams")
            return list(self.received)

    def payloads(self) -> set[bytes]:
        with self._cond:
            return {r.payload for r in self.received}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
