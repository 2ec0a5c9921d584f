"""Admission and deadlines for admin connections, in front of aiohttp's HTTP/1.1 protocol.

aiohttp parses HTTP; it has no deadline for a request head that never ends
and no limit on connections. A slow client (one byte per second) would hold
a connection for as long as it likes. :class:`ConnectionGuard` wraps each of
aiohttp's per-connection protocols (:class:`GuardedProtocol`, which only
forwards the asyncio callbacks) and adds:

- **a head deadline**: a connection whose request has not reached the
  handler within ``read_timeout`` is answered 408 and closed;
- **a byte cap before the handler**: more than :data:`PENDING_BYTES_CAP`
  bytes without a complete head is answered 431 and closed, so a pending
  connection costs at most a few KiB whatever aiohttp's parser buffers;
- **eviction instead of refusal**: a peer (IPv4 address or IPv6 /64) has at
  most :data:`MAX_PENDING_PER_PEER` connections waiting for their head, the
  server at most :data:`MAX_CONNECTIONS` connections. A new connection over
  either limit evicts the *oldest waiting* connection rather than being
  refused: a liveness probe sends its head at once, so it always gets its
  turn while slow connections are the ones that go (issue 12, item 13);
  only when every connection is busy in a handler is the new one refused.
  A connection younger than :data:`EVICTION_GRACE` is not evicted for its
  peer's cap (the cap is enforced once it is that old), and one whose head
  has arrived no longer counts as waiting: in a burst of reconnecting slow
  clients, a probe accepted among them has time to be read;
- **a write deadline**: once the handler has answered, the connection has
  ``write_timeout`` seconds to take the response.

The two canned answers (408, 431) are written here because there is no
request object to answer with: they are constants, not parsed input.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

from lb.control.admin_auth import peer_key

logger = logging.getLogger(__name__)

#: Connections open at once (waiting, in a handler, or writing).
MAX_CONNECTIONS = 256
#: Connections of one peer still waiting for their request head.
MAX_PENDING_PER_PEER = 16
#: Bytes a connection may send before its request reaches the handler: a full head and body.
PENDING_BYTES_CAP = 8192 + 1024
#: Seconds a new connection is safe from its peer's cap: accept, ``connection_made`` and the first
#: read take a few loop iterations, and a burst of connects from the same peer must not evict a
#: probe before its head, sent with the connect, has been read.
EVICTION_GRACE = 0.1
#: After a canned answer, seconds spent reading and discarding what the client still sends: closing
#: with unread input makes the kernel send a reset, which can destroy the answer before it is read.
LINGER_SECONDS = 1.0


def _canned(status: int, phrase: str, message: str) -> bytes:
    body = b'{"error":"' + message.encode("ascii") + b'"}\n'
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n"
    )
    return head.encode("ascii") + body


HEAD_TIMEOUT_RESPONSE = _canned(408, "Request Timeout", "request not received in time")
HEAD_TOO_LARGE_RESPONSE = _canned(431, "Request Header Fields Too Large", "request head too large")


class GuardedProtocol(asyncio.Protocol):
    """One admin connection: forwards every callback to aiohttp's protocol, under the guard's rules."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self.transport: asyncio.Transport | None = None
        self.peer = "local"
        self.pending = True  # no request has reached the handler yet
        self.received = 0
        self._timer: asyncio.TimerHandle | None = None
        self._admitted = False
        self._answered = False  # a canned answer is out; the rest of the input is discarded
        self._started_at = 0.0  # loop time of connection_made
        self.admitted_at = 0.0  # loop time the guard admitted it (the grace before eviction counts from it)
        self._tail = b""  # the last 3 bytes received while pending: a head's end may straddle reads

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not subclass asyncio.Transport, hence no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.peer = peer_key(transport.get_extra_info("peername"))
        if not self._guard.admit(self):
            self.transport.abort()
            return
        self._admitted = True
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._timer = loop.call_later(self._guard.read_timeout, self._head_timed_out)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        if self.pending:
            self.received += len(data)
            if self.received > PENDING_BYTES_CAP:
                self.answer_and_close(HEAD_TOO_LARGE_RESPONSE)
                return
            seen = self._tail + data
            if b"\r\n\r\n" in seen:
                self._guard.head_arrived(self)  # not waiting any more: no longer a candidate for eviction
            self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._guard.forget(self)
        if self._admitted:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- the guard's side ---------------------------------------------------------------

    def request_started(self) -> None:
        """The request head is parsed and the handler runs: no longer a waiting connection."""
        if self.pending:
            self.pending = False
            self._cancel_timer()
            self._guard.started(self)

    def read_time_left(self) -> float:
        """Seconds left for the rest of the request (its body): the head and body share one deadline."""
        elapsed = asyncio.get_running_loop().time() - self._started_at
        return max(0.0, self._guard.read_timeout - elapsed)

    def response_ready(self) -> None:
        """The handler has answered: the client has ``write_timeout`` to read the response."""
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(self._guard.write_timeout, self.abort)

    def answer_and_close(self, response: bytes) -> None:
        """Send a canned answer, then discard input for :data:`LINGER_SECONDS` and close."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._answered:
            return
        self._answered = True
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.close)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.pending:
            self._guard.head_timeouts += 1
            self.answer_and_close(HEAD_TIMEOUT_RESPONSE)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ConnectionGuard:
    """The admission rules for one listening socket; see the module docstring."""

    def __init__(
        self,
        *,
        read_timeout: float,
        write_timeout: float,
        max_connections: int = MAX_CONNECTIONS,
        max_pending_per_peer: int = MAX_PENDING_PER_PEER,
    ) -> None:
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        self.max_pending_per_peer = max_pending_per_peer
        # Insertion order is age: the first waiting connection is the oldest.
        self._pending: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self._pending_by_peer: dict[str, OrderedDict[GuardedProtocol, None]] = {}
        self._busy: set[GuardedProtocol] = set()
        self._by_transport: dict[asyncio.BaseTransport, GuardedProtocol] = {}
        self._recheck: dict[str, asyncio.TimerHandle] = {}  # peers over their cap, by grace timer
        #: Connections closed to make room for newer ones, new ones refused, heads late (monotonic).
        self.evicted = 0
        self.refused = 0
        self.head_timeouts = 0

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], GuardedProtocol]:
        """What ``loop.create_server`` calls: aiohttp's protocol behind a :class:`GuardedProtocol`."""
        return lambda: GuardedProtocol(self, inner())

    def __len__(self) -> int:
        return len(self._pending) + len(self._busy)

    def connection_of(self, transport: asyncio.BaseTransport | None) -> GuardedProtocol | None:
        return self._by_transport.get(transport) if transport is not None else None

    def admit(self, conn: GuardedProtocol) -> bool:
        if len(self) >= self.max_connections:
            if not self._pending:
                self.refused += 1
                return False
            self._evict(next(iter(self._pending)))
        conn.admitted_at = asyncio.get_running_loop().time()
        self._pending[conn] = None
        self._pending_by_peer.setdefault(conn.peer, OrderedDict())[conn] = None
        assert conn.transport is not None
        self._by_transport[conn.transport] = conn
        self._enforce_peer_cap(conn.peer)
        return True

    def started(self, conn: GuardedProtocol) -> None:
        self._unlist_pending(conn)
        self._busy.add(conn)

    head_arrived = started  # a complete head is not waiting any more, whether or not the handler runs yet

    def _enforce_peer_cap(self, peer: str) -> None:
        """Evict the peer's oldest waiting connections beyond its cap, once they are past the grace."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        mine = self._pending_by_peer.get(peer)
        while mine is not None and len(mine) > self.max_pending_per_peer:
            oldest = next(iter(mine))
            if now - oldest.admitted_at < EVICTION_GRACE:
                if peer not in self._recheck:  # one timer per peer, however many connect meanwhile
                    delay = oldest.admitted_at + EVICTION_GRACE - now
                    self._recheck[peer] = loop.call_later(delay, self._recheck_peer, peer)
                return
            self._evict(oldest)
            mine = self._pending_by_peer.get(peer)

    def _recheck_peer(self, peer: str) -> None:
        del self._recheck[peer]
        self._enforce_peer_cap(peer)

    def forget(self, conn: GuardedProtocol) -> None:
        self._unlist_pending(conn)
        self._busy.discard(conn)
        if conn.transport is not None and self._by_transport.get(conn.transport) is conn:
            del self._by_transport[conn.transport]

    def close_all(self) -> None:
        for timer in self._recheck.values():
            timer.cancel()
        self._recheck.clear()
        for conn in [*self._pending, *self._busy]:
            conn.close()

    def _evict(self, conn: GuardedProtocol) -> None:
        self.evicted += 1
        self._unlist_pending(conn)
        conn.abort()

    def _unlist_pending(self, conn: GuardedProtocol) -> None:
        self._pending.pop(conn, None)
        mine = self._pending_by_peer.get(conn.peer)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self._pending_by_peer[conn.peer]
