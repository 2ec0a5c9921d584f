"""The two transports around a backend's aioquic server: the socket's protocol and the shim aioquic writes to.

aioquic only ever calls ``sendto(data, addr)`` and ``close()`` on its transport
and treats ``addr`` as an opaque value compared with ``==``, so it never
notices that the "socket" it writes to is :class:`ReplyShim`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backends.server import BackendServer

log = logging.getLogger("quiclb.backend")


class ReplyShim(asyncio.DatagramTransport):
    """The only transport aioquic sees: ``sendto`` goes through the backend's return path."""

    def __init__(self, backend: BackendServer) -> None:
        super().__init__()
        self._backend = backend

    def sendto(self, data: Any, addr: Any = None) -> None:
        self._backend.send_reply(bytes(data), addr)

    def close(self) -> None:
        self._backend.close_socket()

    def abort(self) -> None:
        self._backend.close_socket()

    def is_closing(self) -> bool:
        return self._backend.is_closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._backend.socket_extra_info(name, default)


class DecapEndpoint(asyncio.DatagramProtocol):
    """The outer socket's protocol: hands every datagram to the backend."""

    def __init__(self, backend: BackendServer) -> None:
        self._backend = backend

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._backend.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self._backend.stats.send_errors += 1
        log.debug("socket error: %s", exc)
