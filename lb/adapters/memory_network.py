"""An in-memory UDP network: the LB's datapath, health checker and reload run in tests without sockets.

Modelled on trio's fake net (``python-trio/trio:src/trio/testing/_fake_net.py``):
addresses map to in-memory endpoints, and every datagram passes through
:attr:`MemoryNetwork.route_packet`, a hook that may deliver it, drop it,
duplicate it or delay it. Delivery is asynchronous, as with real UDP: a
datagram sent now is handed to its receiver on a later event-loop iteration
(``call_soon``), never inside ``sendto``, so handlers never re-enter each other.

What it imitates of the kernel, because the datapath's counters depend on it:

* ``sendto`` raises ``OSError`` for what a real socket refuses synchronously —
  a payload over :data:`MAX_UDP_PAYLOAD` (``EMSGSIZE``), a destination of the
  other address family (``EAFNOSUPPORT``) — and for a closed endpoint;
* a datagram to an address nobody is bound to vanishes (counted in
  :attr:`MemoryNetwork.undeliverable`): unconnected UDP sockets see no ICMP error.

:meth:`MemoryNetwork.open_endpoint` has the signature of
:data:`lb.adapters.asyncio_datapath.OpenEndpoint`, so ``AsyncioDatapath(network.open_endpoint)``
is the production datapath over this network.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from lb.core.addresses import Address, normalize_address

#: The largest UDP payload by IP version (65535 - 20 IP - 8 UDP; IPv6's length excludes its header).
MAX_UDP_PAYLOAD = {4: 65507, 6: 65527}
#: Ports handed out for binds to port 0 (the Linux ephemeral range).
EPHEMERAL_PORTS = range(32768, 61000)

DatagramHandler = Callable[[bytes, Address], None]
ErrorHandler = Callable[[Exception], None]


@dataclass(frozen=True, slots=True)
class Packet:
    """One datagram in flight."""

    source: Address
    destination: Address
    payload: bytes


class MemoryEndpoint:
    """A bound in-memory UDP socket; ``sendto`` is the only way out, ``on_datagram`` the only way in."""

    def __init__(self, network: MemoryNetwork, address: Address, on_datagram: DatagramHandler) -> None:
        self.network = network
        self.address = address
        self.on_datagram = on_datagram
        self.closed = False
        self._v6 = ":" in address[0]
        self._max_payload = MAX_UDP_PAYLOAD[6 if self._v6 else 4]

    def sendto(self, data: bytes, address: Address) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "endpoint closed")
        if (":" in address[0]) != self._v6:
            raise OSError(errno.EAFNOSUPPORT, "address family mismatch")
        if len(data) > self._max_payload:
            raise OSError(errno.EMSGSIZE, "Message too long")
        self.network.send(Packet(self.address, normalize_address(address), bytes(data)))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.network.unbind(self)


class MemoryNetwork:
    """Endpoints by address, and the packets between them.

    ``route_packet(packet)`` decides each datagram's fate; the default delivers
    it. A replacement calls :meth:`deliver` zero, one or more times, now or
    later (``loop.call_later``: :meth:`deliver` keeps :meth:`settle` waiting).
    """

    def __init__(self) -> None:
        self._endpoints: dict[Address, list[MemoryEndpoint]] = {}
        self._ports = itertools.cycle(EPHEMERAL_PORTS)
        self.route_packet: Callable[[Packet], None] = self.deliver
        self.delivered = 0
        self.undeliverable = 0
        self._in_flight = 0

    # -- binding --------------------------------------------------------------

    def bind(self, address: Address, on_datagram: DatagramHandler, *, reuse_port: bool = False) -> MemoryEndpoint:
        host, port = normalize_address(address)
        if port == 0:
            port = next(p for p in self._ports if (host, p) not in self._endpoints)
        bound = self._endpoints.setdefault((host, port), [])
        if bound and not reuse_port:
            raise OSError(errno.EADDRINUSE, f"address already in use: {host}:{port}")
        endpoint = MemoryEndpoint(self, (host, port), on_datagram)
        bound.append(endpoint)
        return endpoint

    async def open_endpoint(
        self, address: Address, on_datagram: DatagramHandler, on_error: ErrorHandler, reuse_port: bool
    ) -> MemoryEndpoint:
        """:data:`~lb.adapters.asyncio_datapath.OpenEndpoint` over this network (``on_error`` is never called)."""
        del on_error  # no asynchronous errors in memory
        return self.bind(address, on_datagram, reuse_port=reuse_port)

    def unbind(self, endpoint: MemoryEndpoint) -> None:
        bound = self._endpoints.get(endpoint.address, [])
        if endpoint in bound:
            bound.remove(endpoint)
        if not bound:
            self._endpoints.pop(endpoint.address, None)

    def is_bound(self, address: Address) -> bool:
        return normalize_address(address) in self._endpoints

    # -- traffic --------------------------------------------------------------

    def send(self, packet: Packet) -> None:
        self.route_packet(packet)

    def deliver(self, packet: Packet) -> None:
        """Hand ``packet`` to its receiver on a later loop iteration (the default ``route_packet``)."""
        self._in_flight += 1
        asyncio.get_running_loop().call_soon(self._arrive, packet)

    def deliver_later(self, packet: Packet, delay: float) -> None:
        """For ``route_packet`` hooks that delay: :meth:`deliver` after ``delay`` seconds."""
        self._in_flight += 1

        def later() -> None:
            self._in_flight -= 1
            self.deliver(packet)

        asyncio.get_running_loop().call_later(delay, later)

    def _arrive(self, packet: Packet) -> None:
        self._in_flight -= 1
        bound = self._endpoints.get(packet.destination)
        if not bound:
            self.undeliverable += 1
            return
        self.delivered += 1
        # A reuse-port group: the oldest member receives (deterministic, like a fixed kernel hash).
        bound[0].on_datagram(packet.payload, packet.source)

    async def settle(self, timeout: float = 5.0) -> None:
        """Return once no datagram is in flight (each delivery may send more: replies, forwards)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._in_flight:
            if loop.time() > deadline:
                raise TimeoutError(f"memory network did not settle: {self._in_flight} datagrams in flight")
            await asyncio.sleep(0)
