"""The test client's sockets: the switchable transport a QUIC connection writes to, and the socket protocol.

A connection has no notion of its local address: it writes to whatever
transport it holds. :class:`SwitchableTransport` forwards to the current
socket, which the client swaps underneath it (rebinding, migration).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class SocketOwner(Protocol):
    """What the sockets report to (``backends.client.EchoClient``)."""

    def _record_sent(self, data: bytes) -> None: ...

    def _datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None: ...


class SwitchableTransport(asyncio.DatagramTransport):
    """The connection's transport: forwards to the current socket and records what is sent."""

    def __init__(self, current: asyncio.DatagramTransport, client: SocketOwner) -> None:
        super().__init__()
        self.current = current
        self._client = client

    def sendto(self, data: Any, addr: Any = None) -> None:
        self._client._record_sent(bytes(data))
        self.current.sendto(data, addr)

    def close(self) -> None:
        self.current.close()

    def abort(self) -> None:
        self.current.abort()

    def is_closing(self) -> bool:
        return self.current.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.current.get_extra_info(name, default)


class SocketProtocol(asyncio.DatagramProtocol):
    """One local socket; hands datagrams to the QUIC protocol while it is current."""

    def __init__(self, client: SocketOwner) -> None:
        self._client = client

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._client._datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors: QUIC recovers by retransmission or times out
