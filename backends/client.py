"""A QUIC test client for the demo and the tests: echo, HTTP/3, CID changes, rebinding, migration.

::

    async with EchoClient.connect("127.0.0.1", 4433, cadata=pem) as client:
        assert await client.echo(b"hello") == b"hello"
        client.change_cid()            # switch to a spare server-issued CID
        await client.rebind()          # NAT rebinding: new local port, same CID
        await client.migrate("127.0.0.2")  # new CID + new socket on another address
        print(client.wire.sent_short_dcids, client.wire.server_cids)

What the client records (:class:`WireRecord`), for routing assertions:

* every DCID it put on the wire in short-header packets, parsed from the
  datagrams themselves (first byte, then the DCID sliced at the server's CID
  length) as they go through the transport, and long-header DCIDs separately;
* every CID the server issued: the handshake SCID (sequence 0) and each
  NEW_CONNECTION_ID, read from the connection's peer-CID list after every
  received datagram and, independently, from the NEW_CONNECTION_ID frames the
  connection decoded (through a qlog trace that keeps only what we need);
* PATH_CHALLENGE frames received (the server validating a new client address).

Moving between sockets: a connection has no notion of its local address, it
writes to whatever transport it holds. The client hands it a
:class:`SwitchableTransport` and swaps the socket underneath (rebind), after
switching to a new CID for an active migration.

The handshake is awaited through our own ``HandshakeCompleted`` handling, not
``wait_connected()`` started late, which can miss a fast loopback handshake
and hang (aioquic-integration pitfall).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamDataReceived

from backends.apps import ECHO_ALPN
from backends.client_sockets import SocketProtocol, SwitchableTransport
from backends.client_wire import FrameLogger, WireRecord
from backends.routable_cids import current_peer_cid, peer_cids
from backends.stateless import end_silently, is_stateless_reset
from lb.core.addresses import Address, ip_version

#: Default seconds for the handshake and for each request.
DEFAULT_TIMEOUT = 5.0


class ClientError(Exception):
    """The connection failed, closed, or a request timed out."""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class _ClientProtocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection, stream_handler: QuicStreamHandler | None = None) -> None:
        super().__init__(quic, stream_handler=stream_handler)
        self.connection = quic
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[str | None] = loop.create_future()
        self.terminated: ConnectionTerminated | None = None
        self._streams: dict[int, tuple[bytearray, asyncio.Future[bytes]]] = {}
        self._h3: H3Connection | None = None
        self._h3_requests: dict[int, tuple[list[tuple[bytes, bytes]], bytearray, asyncio.Future[HttpResponse]]] = {}
        if quic.configuration.alpn_protocols and quic.configuration.alpn_protocols[0] in H3_ALPN:
            self._h3 = H3Connection(quic)

    def expect_stream(self, stream_id: int) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._streams[stream_id] = (bytearray(), future)
        return future

    def expect_response(self, stream_id: int) -> asyncio.Future[HttpResponse]:
        future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
        self._h3_requests[stream_id] = ([], bytearray(), future)
        return future

    @property
    def h3(self) -> H3Connection:
        if self._h3 is None:
            raise ClientError("not an HTTP/3 connection (alpn is not h3)")
        return self._h3

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            if not self.handshake.done():
                self.handshake.set_result(event.alpn_protocol)
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
            error = ClientError(f"connection closed: error {event.error_code} {event.reason_phrase!r}")
            if not self.handshake.done():
                self.handshake.set_exception(error)
            for _, future in self._streams.values():
                if not future.done():
                    future.set_exception(error)
            for _, _, response in self._h3_requests.values():
                if not response.done():
                    response.set_exception(error)
        if self._h3 is not None:
            for h3_event in self._h3.handle_event(event):
                self._h3_event(h3_event)
        elif isinstance(event, StreamDataReceived):
            entry = self._streams.get(event.stream_id)
            if entry is not None:
                entry[0].extend(event.data)
                if event.end_stream:
                    del self._streams[event.stream_id]
                    if not entry[1].done():
                        entry[1].set_result(bytes(entry[0]))

    def _h3_event(self, event: H3Event) -> None:
        entry = self._h3_requests.get(event.stream_id) if hasattr(event, "stream_id") else None
        if entry is None:
            return
        headers, body, future = entry
        if isinstance(event, HeadersReceived):
            headers.extend(event.headers)
            ended = event.stream_ended
        elif isinstance(event, DataReceived):
            body.extend(event.data)
            ended = event.stream_ended
        else:
            return
        if ended:
            del self._h3_requests[event.stream_id]
            fields = {k.decode(): v.decode() for k, v in headers}
            status = int(fields.pop(":status", "0"))
            if not future.done():
                future.set_result(HttpResponse(status, fields, bytes(body)))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ip_version(host) == 6 else socket.AF_INET


class EchoClient:
    """One QUIC connection to ``host:port`` (IP literals only; loopback in tests)."""

    def __init__(
        self, protocol: _ClientProtocol, *, remote: NetworkAddress, record: WireRecord,
        frame_logger: FrameLogger, timeout: float,
    ) -> None:
        self.protocol = protocol
        self._switch: SwitchableTransport | None = None
        self.remote = remote
        self.wire = record
        self._frame_logger = frame_logger
        self.timeout = timeout
        self.alpn: str | None = None
        self.local_address: Address = ("", 0)

    # -- construction --------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        server_name: str = "localhost",
        alpn: str = ECHO_ALPN,
        cafile: str | None = None,
        cadata: bytes | None = None,
        verify: bool = True,
        local_host: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        idle_timeout: float = 30.0,
    ) -> EchoClient:
        """Connect and complete the handshake; raises :class:`ClientError` on failure or timeout."""
        family = _family(host)
        if local_host is None:
            local_host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        remote: NetworkAddress = (host, port, 0, 0) if family == socket.AF_INET6 else (host, port)
        record = WireRecord()
        frame_logger = FrameLogger(record)
        config = QuicConfiguration(
            is_client=True, alpn_protocols=[alpn], server_name=server_name, idle_timeout=idle_timeout,
            quic_logger=frame_logger,
        )
        if not verify:
            config.verify_mode = ssl.CERT_NONE
        elif cafile is not None or cadata is not None:
            config.load_verify_locations(cafile=cafile, cadata=cadata)
        protocol = _ClientProtocol(QuicConnection(configuration=config))
        client = cls(protocol, remote=remote, record=record, frame_logger=frame_logger, timeout=timeout)
        transport = await client._open_socket(local_host, family)
        client._switch = SwitchableTransport(transport, client)
        protocol.connection_made(client._switch)
        protocol.connect(remote)
        try:
            client.alpn = await asyncio.wait_for(asyncio.shield(protocol.handshake), timeout)
        except (TimeoutError, ClientError) as exc:
            client._switch.close()
            if isinstance(exc, ClientError):
                raise
            raise ClientError(f"handshake with {host}:{port} timed out after {timeout} s") from None
        client._note_peer_cids()
        return client

    @classmethod
    @asynccontextmanager
    async def connect(cls, host: str, port: int, **kwargs: Any) -> AsyncIterator[EchoClient]:
        """``async with EchoClient.connect(...) as client``: :meth:`open`, then :meth:`close`."""
        client = await cls.open(host, port, **kwargs)
        try:
            yield client
        finally:
            await client.close()

    async def _open_socket(self, local_host: str, family: socket.AddressFamily) -> asyncio.DatagramTransport:
        loop = asyncio.get_running_loop()
        used = set(self.wire.local_addresses)
        for _ in range(16):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: SocketProtocol(self), local_addr=(local_host, 0), family=family
            )
            sockname = transport.get_extra_info("sockname")
            if (sockname[0], sockname[1]) not in used:
                break
            # The kernel may hand out a port this client used before; a path the server has
            # already validated would then get no PATH_CHALLENGE. A rebinding means a new address.
            transport.close()
        else:
            raise ClientError(f"no new local port on {local_host} in 16 tries")
        self.local_address = (sockname[0], sockname[1])
        self.wire.local_addresses.append(self.local_address)
        return transport

    # -- recording -----------------------------------------------------------------

    def _record_sent(self, data: bytes) -> None:
        record = self.wire
        record.datagrams_sent += 1
        if not data:
            return
        if data[0] & 0x80:  # long header: DCID length at byte 5 (RFC 9000 §17.2)
            if len(data) > 6:
                record.sent_long_dcids.add(data[6 : 6 + data[5]])
            return
        # Short header: the DCID has the length of the server's CIDs (all equal).
        dcid = data[1 : 1 + len(current_peer_cid(self.protocol.connection))]
        if dcid not in record.sent_short_dcids:
            record.sent_short_dcids.append(dcid)

    def _datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.wire.datagrams_received += 1
        conn = self.protocol.connection
        if self.protocol.terminated is None and is_stateless_reset(conn, data):
            # aioquic ignores resets (its clients wait for the idle timeout); RFC 9000 §10.3.1.
            self.wire.stateless_resets += 1
            end_silently(conn)
            self.protocol.quic_event_received(
                ConnectionTerminated(error_code=0, frame_type=None, reason_phrase="stateless reset")
            )
            return
        self.protocol.datagram_received(data, addr)
        self._note_peer_cids()

    def _note_peer_cids(self) -> None:
        for sequence, cid in peer_cids(self.protocol.connection):
            self.wire.server_cids.setdefault(sequence, cid)
        if self._frame_logger.trace is not None:
            self._frame_logger.trace.flush()

    # -- operations ----------------------------------------------------------------

    @property
    def quic(self) -> QuicConnection:
        return self.protocol.connection

    @property
    def dcid(self) -> bytes:
        """The DCID short-header packets currently carry."""
        return current_peer_cid(self.protocol.connection)

    def _check_open(self) -> None:
        if self.protocol.terminated is not None:
            raise ClientError(f"connection closed: {self.protocol.terminated.reason_phrase!r}")

    async def _await(self, future: asyncio.Future[Any], what: str, timeout: float | None) -> Any:
        try:
            return await asyncio.wait_for(future, timeout if timeout is not None else self.timeout)
        except TimeoutError:
            raise ClientError(f"{what} timed out") from None

    async def echo(self, data: bytes, *, timeout: float | None = None) -> bytes:
        """Send ``data`` on a new bidirectional stream with FIN; return what came back before FIN."""
        self._check_open()
        quic = self.protocol.connection
        stream_id = quic.get_next_available_stream_id()
        future = self.protocol.expect_stream(stream_id)
        quic.send_stream_data(stream_id, data, end_stream=True)
        self.protocol.transmit()
        result: bytes = await self._await(future, "echo", timeout)
        return result

    async def request(
        self, method: str, path: str, body: bytes = b"", *, timeout: float | None = None
    ) -> HttpResponse:
        """One HTTP/3 request (``alpn="h3"``)."""
        self._check_open()
        h3 = self.protocol.h3
        quic = self.protocol.connection
        stream_id = quic.get_next_available_stream_id()
        future = self.protocol.expect_response(stream_id)
        authority = quic.configuration.server_name or "localhost"
        headers = [
            (b":method", method.encode()), (b":scheme", b"https"),
            (b":authority", authority.encode()), (b":path", path.encode()),
        ]
        if body:
            headers.append((b"content-length", str(len(body)).encode()))
        h3.send_headers(stream_id, headers, end_stream=not body)
        if body:
            h3.send_data(stream_id, body, end_stream=True)
        self.protocol.transmit()
        response: HttpResponse = await self._await(future, f"{method} {path}", timeout)
        return response

    async def ping(self, *, timeout: float | None = None) -> None:
        self._check_open()
        await self._await(asyncio.ensure_future(self.protocol.ping()), "ping", timeout)

    def change_cid(self) -> bool:
        """Switch to a spare server-issued CID (retiring the current one). False if none is spare."""
        before = self.dcid
        self.protocol.change_connection_id()
        return self.dcid != before

    async def rebind(self, local_host: str | None = None) -> Address:
        """Send from a new local socket (new port; ``local_host`` defaults to the current one).

        With the CID unchanged this is a NAT rebinding; the server validates the
        new address with PATH_CHALLENGE. Returns the new local address.
        """
        assert self._switch is not None
        host = local_host if local_host is not None else self.local_address[0]
        old = self._switch.current
        self._switch.current = await self._open_socket(host, _family(self.remote[0]))
        old.close()
        return self.local_address

    async def migrate(self, local_host: str = "127.0.0.2") -> Address:
        """Active migration: a new CID and a new socket on ``local_host`` (IPv4: any 127.0.0.x;
        IPv6 targets: use ``"::1"``, only the port changes). Returns the new local address."""
        self.protocol.connection.change_connection_id()  # no transmit yet: the new CID first goes out
        address = await self.rebind(local_host)  # ... from the new socket
        self.protocol.transmit()
        return address

    async def close(self, *, wait: bool = True) -> None:
        """Send CONNECTION_CLOSE; with ``wait`` also wait out the closing period (bounded)."""
        if self._switch is None:
            return
        if self.protocol.terminated is None:
            self.protocol.close()
            if wait:
                try:
                    await asyncio.wait_for(self.protocol.wait_closed(), self.timeout)
                except TimeoutError:
                    pass
        self._switch.close()
        self._switch = None
