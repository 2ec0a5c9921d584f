"""asyncio (and uvloop) datagram endpoints: the thin I/O shell around the core.

Each VIP socket feeds :meth:`Router.route` and forwards to the chosen backend
through a callback; the inside socket feeds the return path. Nothing clever
happens here: parse errors, drops and counters all live in ``lb.core``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from lb.core.addresses import Address
from lb.core.router import Router
from lb.core.service_table import Backend

ForwardFn = Callable[[bytes, Address, Backend], None]
DatagramFn = Callable[[bytes, Address], None]


class VipProtocol(asyncio.DatagramProtocol):
    """Client datagrams arriving on one VIP."""

    def __init__(self, router: Router, forward: ForwardFn) -> None:
        self.router = router
        self.forward = forward
        self.transport: asyncio.DatagramTransport | None = None
        self.errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        _, backend = self.router.route(data, addr)
        if backend is not None:
            self.forward(data, addr, backend)

    def error_received(self, exc: Exception) -> None:
        self.errors += 1


class CallbackProtocol(asyncio.DatagramProtocol):
    """Hands every datagram to a callback (the inside socket, the health-probe socket)."""

    def __init__(self, on_datagram: DatagramFn) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None
        self.errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors reported on the socket (e.g. a backend port closed): counted, never fatal.
        self.errors += 1
