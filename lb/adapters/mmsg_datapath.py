"""The Linux datapath: recvmmsg batches, Router.route_batch, sendmmsg scatter-gather, no payload copies.

One process's sockets, wired: VIP ports (``lb.adapters.mmsg_forward``: client
datagrams in, encapsulated forwards out through the inside socket), the
inside port (``lb.adapters.mmsg_return``: backend replies in, payloads out
from their VIP), and the health checker's probe sockets (plain asyncio
endpoints: a few datagrams per second).

Every datagram ends in one counted outcome: the router's or the return
path's, or one of the adapter's own drops (``rx_truncated``,
``tx_queue_full``, ``tx_reply_queue_full``) or send errors
(``backend_unreachable``, ``tx_to_client_errors``). :meth:`MmsgDatapath.stats`
adds them up so that ``rx = routed + fallback + every drop`` holds end to end.
Forwards handed to the kernel are not counted one by one (that would be a
dictionary update per datagram): they are the router's per-backend decisions
minus the forwards the adapter could not send, which it counts per backend.
"""

from __future__ import annotations

import asyncio
import socket

from lb.adapters.datapath import DatagramHandler, DatapathStats
from lb.adapters.mmsg import count_into
from lb.adapters.mmsg_forward import Destinations, MmsgVipPort
from lb.adapters.mmsg_return import MmsgInsidePort
from lb.adapters.udp_socket import bind_udp
from lb.core.addresses import Address, normalize_address
from lb.core.return_path import ReturnPath
from lb.core.router import Router


class MmsgDatapath:
    """The batched datapath of one LB process (see the module header); implements ``Datapath``."""

    def __init__(self) -> None:
        self.ports: dict[Address, MmsgVipPort] = {}
        self._retired_ports: list[MmsgVipPort] = []
        self._destinations = Destinations()
        self.inside: socket.socket | None = None
        self.inside_fd = -1
        self._inside_port: MmsgInsidePort | None = None
        self._probe_transports: list[asyncio.DatagramTransport] = []
        #: Errors a socket reported outside any send, by socket role.
        self.socket_errors: dict[str, int] = {}

    # -- the Datapath interface -----------------------------------------------------

    async def open_inside(self, address: Address, return_path: ReturnPath) -> None:
        self.inside = bind_udp(address)
        self.inside_fd = self.inside.fileno()
        self._inside_port = MmsgInsidePort(self, self.inside, return_path)

    async def open_vip(self, service: str, vip: Address, router: Router) -> MmsgVipPort:
        port = MmsgVipPort(self, service, bind_udp(vip), normalize_address(vip), router)
        old = self.ports.get(port.vip)
        if old is not None:  # a VIP opened again: the new socket takes over
            self.retire(old)
        self.ports[port.vip] = port
        if self._inside_port is not None:
            self._inside_port.forget_accepted()
        return port

    async def open_probe(self, host: str, on_datagram: DatagramHandler) -> _ProbePort:
        loop = asyncio.get_running_loop()
        sock = bind_udp((host, 0), reuse_port=False)
        transport, _ = await loop.create_datagram_endpoint(lambda: _ProbeProtocol(on_datagram, self), sock=sock)
        self._probe_transports.append(transport)
        return _ProbePort(transport, normalize_address(sock.getsockname()[:2]))

    def send_probe(self, datagram: bytes, backend: Address) -> None:
        assert self.inside is not None
        self.inside.sendto(datagram, backend)

    def retire(self, port: MmsgVipPort) -> None:
        """Close one VIP socket; its counters stay in :meth:`stats`."""
        if self.ports.get(port.vip) is port:
            del self.ports[port.vip]
        if port.fd >= 0:
            asyncio.get_running_loop().remove_reader(port.fd)
            port.sock.close()
            port.fd = -1
            self._retired_ports.append(port)
        if self._inside_port is not None:
            self._inside_port.forget_accepted()

    def close(self) -> None:
        for port in list(self.ports.values()):
            self.retire(port)
        if self._inside_port is not None:
            self._inside_port.close()
            self.inside_fd = -1
        for transport in self._probe_transports:
            transport.close()

    def stats(self) -> DatapathStats:
        drops: dict[str, int] = {}
        tx: dict[tuple[str, str], int] = {}
        unreachable: dict[tuple[str, str], int] = {}
        rx = 0
        routers: dict[int, tuple[str, Router]] = {}
        for port in [*self._retired_ports, *self.ports.values()]:
            rx += port.rx
            routers[id(port.router)] = (port.service, port.router)
            for reason, n in port.drops.items():
                count_into(drops, reason, n)
            for label, n in port.unreachable.items():
                unreachable[(port.service, label)] = unreachable.get((port.service, label), 0) + n
            for label, n in port.not_sent.items():
                tx[(port.service, label)] = tx.get((port.service, label), 0) - n
        for service, router in routers.values():  # a moved VIP keeps its router: count it once
            stats = router.stats()
            for (_, label), n in stats.cid_routed.items():
                tx[(service, label)] = tx.get((service, label), 0) + n
            for label, n in stats.fallback_routed.items():
                tx[(service, label)] = tx.get((service, label), 0) + n
        inside = self._inside_port
        rx_backend = tx_errors = returned = 0
        if inside is not None:
            for reason, n in inside.drops.items():
                count_into(drops, reason, n)
            rx_backend, tx_errors = inside.rx, inside.tx_to_client_errors
            returned = inside.return_path.tx - tx_errors - inside.drops.get("tx_reply_queue_full", 0)
        return DatapathStats(
            rx_client_datagrams=rx, rx_backend_datagrams=rx_backend, tx_to_backend=tx,
            backend_unreachable=unreachable, tx_to_client=returned, tx_to_client_errors=tx_errors,
            drops=drops, socket_errors=dict(self.socket_errors),
        )

    def destination(self, address: Address) -> int:
        """Pointer to the sockaddr of ``address`` (made once per address, kept for the process)."""
        return self._destinations.pointer(address)


class _ProbeProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: DatagramHandler, datapath: MmsgDatapath) -> None:
        self._on_datagram = on_datagram
        self._datapath = datapath

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._on_datagram(data, normalize_address(addr))

    def error_received(self, exc: Exception) -> None:
        count_into(self._datapath.socket_errors, "probe")


class _ProbePort:
    def __init__(self, transport: asyncio.DatagramTransport, address: Address) -> None:
        self._transport = transport
        self._address = address

    @property
    def address(self) -> Address:
        return self._address

    def close(self) -> None:
        self._transport.close()
