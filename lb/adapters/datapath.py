"""The datapath interface: what the app asks of the sockets that carry client traffic.

A :class:`Datapath` owns the inside socket (backend replies in, forwards and
probes out) and one port per VIP. The app hands it the core objects — a
:class:`~lb.core.router.Router` per VIP, the :class:`~lb.core.return_path.ReturnPath`
— and never touches a socket itself. Implementations:

* ``lb.adapters.asyncio_datapath``: asyncio/uvloop endpoints, one datagram per
  callback (the portable path), also run over the in-memory network in tests;
* ``lb.adapters.mmsg_datapath``: Linux recvmmsg/sendmmsg, batched routing,
  scatter-gather sends that never copy a payload (the default on Linux).

Every datagram a port receives ends in exactly one counted outcome: a router or
return-path outcome, or one of the adapter's own drops (:class:`DatapathStats`),
so ``rx = routed + fallback + every drop`` holds end to end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from lb.core.addresses import Address
from lb.core.return_path import ReturnPath
from lb.core.router import Router

DatagramHandler = Callable[[bytes, Address], None]


@dataclass(frozen=True)
class DatapathStats:
    """Monotonic adapter counters (never reset by a reload)."""

    #: Client datagrams read from VIP sockets, before routing (includes adapter drops).
    rx_client_datagrams: int = 0
    #: Datagrams read from the inside socket, before the return path (includes adapter drops).
    rx_backend_datagrams: int = 0
    #: Encapsulated client datagrams handed to the kernel, by (service, backend label).
    tx_to_backend: Mapping[tuple[str, str], int] = field(default_factory=dict)
    #: Forwards the kernel refused (send error), by (service, backend label).
    backend_unreachable: Mapping[tuple[str, str], int] = field(default_factory=dict)
    #: Replies handed to the kernel towards clients.
    tx_to_client: int = 0
    #: Replies the kernel refused, or whose VIP went away between check and send.
    tx_to_client_errors: int = 0
    #: Datagrams the adapter itself dropped, by reason (``rx_truncated``, ``tx_queue_full``, ...).
    drops: Mapping[str, int] = field(default_factory=dict)
    #: Errors a socket reported outside any send (ICMP), by socket role (``inside``, ``vip``, ``probe``):
    #: no datagram of ours is attached to them, so they are not drops.
    socket_errors: Mapping[str, int] = field(default_factory=dict)


class VipPort(Protocol):
    """One VIP socket. Routing follows ``router``; its table is swapped through the router."""

    @property
    def vip(self) -> Address: ...

    @property
    def router(self) -> Router: ...

    def close(self) -> None: ...


class ProbePort(Protocol):
    """A plain socket of the health checker: its address is the probes' client address."""

    @property
    def address(self) -> Address: ...

    def close(self) -> None: ...


class Datapath(Protocol):
    """The sockets of one LB process; opened by the app, driven by the event loop."""

    async def open_inside(self, address: Address, return_path: ReturnPath) -> None:
        """Bind the inside address; replies accepted by ``return_path`` leave from their VIP port."""

    async def open_vip(self, service: str, vip: Address, router: Router) -> VipPort:
        """Bind ``vip``; every client datagram is routed by ``router`` and sent through the inside socket."""

    async def open_probe(self, host: str, on_datagram: DatagramHandler) -> ProbePort:
        """A socket on ``host`` (port chosen by the kernel) that hands every datagram to ``on_datagram``."""

    def send_probe(self, datagram: bytes, backend: Address) -> None:
        """Send one already-encapsulated probe from the inside socket (raises OSError on failure)."""

    def stats(self) -> DatapathStats: ...

    def close(self) -> None:
        """Close every socket (VIP ports, inside, probe ports)."""
