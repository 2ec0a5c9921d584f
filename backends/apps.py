"""The applications a backend serves, chosen per connection by the negotiated ALPN.

* ``quiclb-echo``: every byte received on a client-initiated bidirectional
  stream is sent back on that stream, and the FIN is echoed too.
* ``h3``: HTTP/3 through aioquic's :class:`~aioquic.h3.connection.H3Connection`.
  ``GET /`` returns a small page naming the backend's server ID,
  ``POST /echo`` returns the request body, anything else is 404.

Both are sans-IO: they read :class:`~aioquic.quic.events.QuicEvent` objects
and write to the :class:`~aioquic.quic.connection.QuicConnection`; the
connection protocol transmits after every batch of events.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Protocol

from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import QuicEvent, StreamDataReceived, StreamReset

ECHO_ALPN = "quiclb-echo"
#: HTTP/0.9 over QUIC, as the QUIC interop runner's clients speak it.
HQ_ALPNS = ("hq-interop",)
#: Every ALPN a backend offers, in preference order.
BACKEND_ALPNS = (ECHO_ALPN, *H3_ALPN, *HQ_ALPNS)
#: Largest body ``GET /bytes/N`` serves (transfer tests through the LB).
MAX_BYTES_BODY = 64 * 1024 * 1024
#: Longest HTTP/0.9 request line we buffer.
MAX_HQ_REQUEST = 4096
#: Largest HTTP request body kept for POST /echo; larger bodies get 413.
MAX_H3_BODY = 1 << 20


class Application(Protocol):
    def handle_event(self, event: QuicEvent) -> None: ...


@dataclass(frozen=True)
class BackendIdentity:
    """What the applications may tell clients about the backend."""

    server_id: bytes
    service: str = ""


class EchoApplication:
    """Echo each client-initiated bidirectional stream, FIN included."""

    def __init__(self, quic: QuicConnection) -> None:
        self._quic = quic

    def handle_event(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            # Bit 1 of a stream ID is set for unidirectional streams (RFC 9000 §2.1).
            if event.stream_id & 0x2:
                return
            self._quic.send_stream_data(event.stream_id, event.data, end_stream=event.end_stream)
        elif isinstance(event, StreamReset) and not event.stream_id & 0x2:
            self._quic.reset_stream(event.stream_id, event.error_code)


@dataclass
class _Request:
    method: str = ""
    path: str = ""
    body: bytearray = field(default_factory=bytearray)
    too_large: bool = False


class H3Application:
    """A tiny HTTP/3 server: ``GET /``, ``POST /echo``, 404 for the rest."""

    def __init__(self, quic: QuicConnection, identity: BackendIdentity) -> None:
        self._h3 = H3Connection(quic)
        self._identity = identity
        self._requests: dict[int, _Request] = {}

    def handle_event(self, event: QuicEvent) -> None:
        for h3_event in self._h3.handle_event(event):
            self._handle_h3_event(h3_event)

    def _handle_h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            headers = dict(event.headers)
            request = _Request(
                method=headers.get(b":method", b"").decode("ascii", "replace"),
                path=headers.get(b":path", b"").decode("ascii", "replace"),
            )
            self._requests[event.stream_id] = request
            if event.stream_ended:
                self._respond(event.stream_id)
        elif isinstance(event, DataReceived):
            pending = self._requests.get(event.stream_id)
            if pending is None:
                return
            request = pending
            if len(request.body) + len(event.data) > MAX_H3_BODY:
                request.too_large = True
            else:
                request.body += event.data
            if event.stream_ended:
                self._respond(event.stream_id)

    def _respond(self, stream_id: int) -> None:
        request = self._requests.pop(stream_id)
        path = request.path.split("?", 1)[0]
        if request.too_large:
            status, ctype, body = 413, "text/plain; charset=utf-8", b"request body too large\n"
        elif path == "/" and request.method in ("GET", "HEAD"):
            status, ctype, body = 200, "text/html; charset=utf-8", self._index_page()
        elif path == "/echo" and request.method == "POST":
            status, ctype, body = 200, "application/octet-stream", bytes(request.body)
        elif (size := bytes_path_size(path)) is not None and request.method in ("GET", "HEAD"):
            status, ctype, body = 200, "application/octet-stream", bytes(size)
        elif path in ("/", "/echo"):
            status, ctype, body = 405, "text/plain; charset=utf-8", b"method not allowed\n"
        else:
            status, ctype, body = 404, "text/plain; charset=utf-8", b"not found\n"
        server_id = self._identity.server_id.hex()
        headers = [
            (b":status", str(status).encode()),
            (b"content-type", ctype.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"x-quiclb-server-id", server_id.encode()),
        ]
        if request.method == "HEAD":
            self._h3.send_headers(stream_id, headers, end_stream=True)
            return
        self._h3.send_headers(stream_id, headers)
        self._h3.send_data(stream_id, body, end_stream=True)

    def _index_page(self) -> bytes:
        return index_page(self._identity)


def bytes_path_size(path: str) -> int | None:
    """``/bytes/N`` -> N (0..MAX_BYTES_BODY), else ``None``."""
    prefix = "/bytes/"
    if not path.startswith(prefix) or not path[len(prefix) :].isdigit():
        return None
    size = int(path[len(prefix) :])
    return size if size <= MAX_BYTES_BODY else None


def index_page(identity: BackendIdentity) -> bytes:
    sid = html.escape(identity.server_id.hex())
    service = html.escape(identity.service or "-")
    return (
        "<!doctype html>\n<html><head><title>quiclb backend " + sid + "</title></head>\n"
        "<body><h1>quiclb backend</h1>\n"
        "<p>server_id=" + sid + "</p>\n<p>service=" + service + "</p>\n</body></html>\n"
    ).encode()


class HqApplication:
    """HTTP/0.9 over QUIC (``hq-interop``): ``GET /`` and ``GET /bytes/N``; anything else gets an empty body.

    The interop runner's clients speak it; supporting it lets off-the-shelf
    QUIC clients (quic-go, ngtcp2, quiche, ... interop builds) talk to a backend.
    """

    def __init__(self, quic: QuicConnection, identity: BackendIdentity) -> None:
        self._quic = quic
        self._identity = identity
        self._pending: dict[int, bytearray] = {}

    def handle_event(self, event: QuicEvent) -> None:
        if not isinstance(event, StreamDataReceived) or event.stream_id & 0x2:
            return
        buf = self._pending.setdefault(event.stream_id, bytearray())
        if len(buf) + len(event.data) > MAX_HQ_REQUEST:
            self._pending.pop(event.stream_id, None)
            self._quic.reset_stream(event.stream_id, 0)
            return
        buf += event.data
        if not event.end_stream and b"\n" not in buf:
            return
        del self._pending[event.stream_id]
        line = bytes(buf).split(b"\n", 1)[0].strip()
        parts = line.split()
        path = parts[1].decode("ascii", "replace") if len(parts) == 2 and parts[0] == b"GET" else ""
        if path == "/":
            body = index_page(self._identity)
        elif (size := bytes_path_size(path)) is not None:
            body = bytes(size)
        else:
            body = b""
        self._quic.send_stream_data(event.stream_id, body, end_stream=True)


def application_for(alpn: str | None, quic: QuicConnection, identity: BackendIdentity) -> Application | None:
    """The application for a negotiated ALPN, or ``None`` for one we do not serve."""
    if alpn == ECHO_ALPN:
        return EchoApplication(quic)
    if alpn in HQ_ALPNS:
        return HqApplication(quic, identity)
    if alpn in H3_ALPN:
        return H3Application(quic, identity)
    return None
