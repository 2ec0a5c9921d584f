"""The portable datapath: one callback per datagram, over any "open endpoint" function.

:class:`AsyncioDatapath` implements :class:`lb.adapters.datapath.Datapath`.
It never creates a socket itself: an injected :data:`OpenEndpoint` binds an
address and returns an :class:`Endpoint`. :func:`socket_opener` gives real
asyncio/uvloop sockets; :meth:`lb.adapters.memory_network.MemoryNetwork.open_endpoint` gives the
in-memory network of the tests. The glue is the same in both:

* client datagram on a VIP -> ``Router.route_batch`` (a batch of one, so both
  datapaths run the same routing code) -> PROXY v2 header + datagram
  -> the backend, through the inside socket;
* datagram on the inside socket -> ``ReturnPath.handle`` -> payload -> the
  client, through the VIP socket the reply names.

Counting sends honestly: asyncio and uvloop both report a failed ``sendto``
to the protocol's ``error_received`` instead of raising (EMSGSIZE for a
datagram whose header pushes it over the UDP limit, EACCES for a broadcast
destination, a backend of the other address family). :class:`_SocketEndpoint`
therefore turns an error reported *during* its own ``sendto`` call into an
``OSError`` (uvloop raises ``ValueError`` for some itself), so a refused
send is counted as ``backend_unreachable`` / ``tx_to_client_errors``, never as
sent. Errors the kernel reports later (ICMP) carry no datagram; they are
counted per socket in ``socket_errors``.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from lb.adapters.datapath import DatagramHandler, DatapathStats, ProbePort, VipPort
from lb.adapters.udp_socket import bind_udp
from lb.core.addresses import Address, normalize_address
from lb.core.encapsulation import ProxyHeaderEncoder
from lb.core.return_path import ReturnOutcome, ReturnPath
from lb.core.router import Router

ErrorHandler = Callable[[Exception], None]


class Endpoint(Protocol):
    """A bound datagram socket as the datapath uses it."""

    @property
    def address(self) -> Address: ...

    def sendto(self, data: bytes, address: Address) -> None:
        """Send one datagram; raises ``OSError``/``ValueError`` when it is refused."""

    def close(self) -> None: ...


#: ``open(address, on_datagram, on_error, reuse_port) -> Endpoint``: binds and starts receiving.
OpenEndpoint = Callable[[Address, DatagramHandler, ErrorHandler, bool], Awaitable[Endpoint]]


class _SocketEndpoint(asyncio.DatagramProtocol):
    """An asyncio/uvloop transport behind the :class:`Endpoint` surface."""

    def __init__(self, on_datagram: DatagramHandler, on_error: ErrorHandler, address: Address) -> None:
        self.datagram_received = on_datagram  # type: ignore[method-assign,assignment]  # no extra frame per datagram
        self._on_error = on_error
        self.address = address
        self._sending = False
        self._send_error: Exception | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:
        if self._sending:  # reported from inside our own sendto: that send failed
            self._send_error = exc
        else:
            self._on_error(exc)

    def sendto(self, data: bytes, address: Address) -> None:
        transport = self.transport
        assert transport is not None
        self._sending = True
        try:
            transport.sendto(data, address)
        finally:
            self._sending = False
        exc, self._send_error = self._send_error, None
        if exc is not None:
            raise exc

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def socket_opener() -> OpenEndpoint:
    """Real sockets: the running loop's own datagram endpoints (asyncio's or uvloop's)."""

    async def open_endpoint(
        address: Address, on_datagram: DatagramHandler, on_error: ErrorHandler, reuse_port: bool
    ) -> Endpoint:
        sock = bind_udp(address, reuse_port=reuse_port)
        endpoint = _SocketEndpoint(on_datagram, on_error, normalize_address(sock.getsockname()[:2]))
        try:
            await asyncio.get_running_loop().create_datagram_endpoint(lambda: endpoint, sock=sock)
        except BaseException:
            sock.close()
            raise
        return endpoint

    return open_endpoint


class _Port:
    """A VIP or probe port: its endpoint, and what the app needs to know about it."""

    def __init__(
        self, endpoint: Endpoint, vip: Address, router: Router | None, on_close: Callable[[_Port], None]
    ) -> None:
        self.endpoint = endpoint
        self._vip = vip
        self._router = router
        self._on_close = on_close

    @property
    def vip(self) -> Address:
        return self._vip

    @property
    def address(self) -> Address:
        return self.endpoint.address

    @property
    def router(self) -> Router:
        assert self._router is not None
        return self._router

    def close(self) -> None:
        self.endpoint.close()
        self._on_close(self)


class AsyncioDatapath:
    """The :class:`~lb.adapters.datapath.Datapath` of one LB process over ``open_endpoint``."""

    def __init__(self, open_endpoint: OpenEndpoint | None = None) -> None:
        self._open = open_endpoint if open_endpoint is not None else socket_opener()
        self._encode = ProxyHeaderEncoder().encode
        self._inside: Endpoint | None = None
        self._return_path: ReturnPath | None = None
        self._vip_ports: dict[Address, _Port] = {}  # replies leave from the port their header names
        self._ports: list[_Port] = []  # every open VIP and probe port, for stats and close
        self._rx_client = 0
        self._rx_backend = 0
        self._tx_to_backend: dict[tuple[str, str], int] = {}
        self._backend_unreachable: dict[tuple[str, str], int] = {}
        self._tx_to_client = 0
        self._tx_to_client_errors = 0
        self._socket_errors: dict[str, int] = {}

    # -- opening --------------------------------------------------------------

    async def open_inside(self, address: Address, return_path: ReturnPath) -> None:
        self._return_path = return_path
        self._inside = await self._open(address, self._on_inside, self._socket_error("inside"), True)

    async def open_vip(self, service: str, vip: Address, router: Router) -> VipPort:
        vip = normalize_address(vip)
        endpoints: list[Endpoint] = []  # the handler's way back to clients, set once the socket is open
        endpoint = await self._open(
            vip, self._vip_handler(service, vip, router, endpoints), self._socket_error("vip"), True
        )
        endpoints.append(endpoint)
        port = _Port(endpoint, vip, router, self._forget)
        self._ports.append(port)
        self._vip_ports[vip] = port
        return port

    async def open_probe(self, host: str, on_datagram: DatagramHandler) -> ProbePort:
        endpoint = await self._open((host, 0), on_datagram, self._socket_error("probe"), False)
        port = _Port(endpoint, endpoint.address, None, self._forget)
        self._ports.append(port)
        return port

    def _forget(self, port: _Port) -> None:
        if port in self._ports:
            self._ports.remove(port)
        if self._vip_ports.get(port.vip) is port:
            del self._vip_ports[port.vip]
            # A reload may have opened a second port on this VIP (a reuse-port group): it takes over.
            for other in self._ports:
                if other.vip == port.vip and other._router is not None:
                    self._vip_ports[port.vip] = other

    def _socket_error(self, role: str) -> ErrorHandler:
        def count(_exc: Exception) -> None:
            self._socket_errors[role] = self._socket_errors.get(role, 0) + 1

        return count

    # -- the datapath ---------------------------------------------------------

    def _vip_handler(self, service: str, vip: Address, router: Router, endpoints: list[Endpoint]) -> DatagramHandler:
        route_batch = router.route_batch
        lb_replies = router.replies
        encode = self._encode
        tx = self._tx_to_backend
        unreachable = self._backend_unreachable

        def on_client_datagram(data: bytes, client: Address) -> None:
            self._rx_client += 1
            backend = route_batch(data, 0, (len(data),), lambda _: client)[0][1]
            if backend is None:
                if lb_replies.queue:  # a Retry or a reset the router built for this datagram
                    for packet, to in lb_replies.take():
                        try:
                            endpoints[0].sendto(packet, to)
                        except (OSError, ValueError):
                            self._socket_errors["vip"] = self._socket_errors.get("vip", 0) + 1
                return
            key = (service, backend.label)
            inside = self._inside
            try:
                if inside is None:
                    raise OSError(errno.ENOTCONN, "inside socket not open")
                inside.sendto(encode(client, vip) + data, backend.address)
            except (OSError, ValueError):
                unreachable[key] = unreachable.get(key, 0) + 1
                return
            tx[key] = tx.get(key, 0) + 1

        return on_client_datagram

    def _on_inside(self, data: bytes, source: Address) -> None:
        self._rx_backend += 1
        assert self._return_path is not None
        decision = self._return_path.handle(data, source)
        if decision.outcome is not ReturnOutcome.TO_CLIENT:
            return
        assert decision.vip is not None and decision.client is not None
        port = self._vip_ports.get(decision.vip)
        try:
            if port is None:  # the VIP went away in a reload between check and send
                raise OSError(errno.EADDRNOTAVAIL, "no port for this VIP")
            port.endpoint.sendto(decision.payload, decision.client)
        except (OSError, ValueError):
            self._tx_to_client_errors += 1
            return
        self._tx_to_client += 1

    def send_probe(self, datagram: bytes, backend: Address) -> None:
        if self._inside is None:
            raise OSError(errno.ENOTCONN, "inside socket not open")
        self._inside.sendto(datagram, backend)

    # -- observation and shutdown ---------------------------------------------

    def stats(self) -> DatapathStats:
        # No adapter drops here: asyncio reads up to 256 KiB and uvloop 64 KiB per datagram, more
        # than any UDP payload, so every datagram received reaches the router or the return path.
        return DatapathStats(
            rx_client_datagrams=self._rx_client,
            rx_backend_datagrams=self._rx_backend,
            tx_to_backend=dict(self._tx_to_backend),
            backend_unreachable=dict(self._backend_unreachable),
            tx_to_client=self._tx_to_client,
            tx_to_client_errors=self._tx_to_client_errors,
            socket_errors=dict(self._socket_errors),
        )

    def close(self) -> None:
        for port in list(self._ports):
            port.close()
        if self._inside is not None:
            self._inside.close()
