"""Batched datagram I/O with recvmmsg/sendmmsg (Linux), behind the same ``sendto`` surface as asyncio.

A :class:`BatchedPort` owns one non-blocking UDP socket. When the event loop
reports it readable, it drains up to ``MAX_BATCHES_PER_WAKEUP`` batches of
``BATCH`` datagrams with one ``recvmmsg`` call each and hands every datagram to
the protocol's ``datagram_received``. ``sendto`` only queues; the queue is
flushed with one ``sendmmsg`` call per ``BATCH`` datagrams, at the latest on the
next loop iteration (``call_soon``), so the forwards produced by one receive
batch on a VIP socket leave together from the inside socket.

Buffers and message headers are preallocated once per port; the only
per-datagram allocations are the payload ``bytes`` the router needs and the
header the LB prepends. Datagrams larger than the receive buffer are dropped
and counted (``truncated``), never forwarded cut.

Why ctypes: CPython's socket module has ``recvmsg`` but no ``recvmmsg`` /
``sendmmsg``; one system call per datagram costs as much as all the Python
routing work together.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import struct
from collections.abc import Callable
from typing import Any

from lb.core.service_table import Address

#: Datagrams per recvmmsg/sendmmsg call.
BATCH = 64
#: Receive buffer per datagram: QUIC datagrams on the Internet stay well under it.
BUFFER_BYTES = 2048
#: Batches drained per readiness callback before yielding to other sockets.
MAX_BATCHES_PER_WAKEUP = 8
#: sockaddr_storage is 128 bytes on Linux.
SOCKADDR_BYTES = 128
#: Cached sockaddr encodings of destinations (backends, clients); FIFO beyond it.
MAX_CACHED_ADDRESSES = 65536

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint))


def _libc_functions() -> tuple[Any, Any] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recvmmsg.argtypes = (ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = (ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int)
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


_FUNCTIONS = _libc_functions()


def batched_io_available() -> bool:
    """True where libc has recvmmsg and sendmmsg (Linux)."""
    return _FUNCTIONS is not None


_IN4 = struct.Struct("=H")  # sa_family, native order
_PORT = struct.Struct("!H")


def _decode_sockaddr(raw: bytes) -> Address:
    family = _IN4.unpack_from(raw)[0]
    port = _PORT.unpack_from(raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def _encode_sockaddr(address: Address) -> bytes:
    host, port = address[0], address[1]
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host)
        return _IN4.pack(socket.AF_INET6) + _PORT.pack(port) + bytes(4) + packed + bytes(4)
    return _IN4.pack(socket.AF_INET) + _PORT.pack(port) + socket.inet_pton(socket.AF_INET, host) + bytes(8)


class MmsgReceiver:
    """Preallocated recvmmsg state for ``batch`` datagrams of up to ``buffer_bytes`` each."""

    def __init__(self, batch: int = BATCH, buffer_bytes: int = BUFFER_BYTES) -> None:
        self.batch = batch
        self._buffers = (ctypes.c_char * (buffer_bytes * batch))()
        self._names = (ctypes.c_char * (SOCKADDR_BYTES * batch))()
        self._iov = (_Iovec * batch)()
        self._msgs = (_Mmsghdr * batch)()
        base, names = ctypes.addressof(self._buffers), ctypes.addressof(self._names)
        self._buffer_addresses = [base + i * buffer_bytes for i in range(batch)]
        self._buffer_bytes = buffer_bytes
        for i in range(batch):
            self._iov[i].iov_base = self._buffer_addresses[i]
            self._iov[i].iov_len = buffer_bytes
            hdr = self._msgs[i].msg_hdr
            hdr.msg_name = names + i * SOCKADDR_BYTES
            hdr.msg_namelen = SOCKADDR_BYTES
            hdr.msg_iov = ctypes.pointer(self._iov[i])
            hdr.msg_iovlen = 1
        self.truncated = 0

    def receive(self, fd: int) -> list[tuple[bytes, Address]]:
        """One recvmmsg call: the datagrams waiting (possibly none). Raises OSError on real errors."""
        assert _FUNCTIONS is not None
        n = _FUNCTIONS[0](fd, self._msgs, self.batch, MSG_DONTWAIT, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return []
            raise OSError(err, f"recvmmsg: {errno.errorcode.get(err, err)}")
        out = []
        msgs, names = self._msgs, ctypes.addressof(self._names)
        string_at = ctypes.string_at
        for i in range(n):
            hdr = msgs[i].msg_hdr
            namelen = hdr.msg_namelen
            hdr.msg_namelen = SOCKADDR_BYTES  # the kernel overwrote it: reset for the next call
            if hdr.msg_flags & MSG_TRUNC:
                self.truncated += 1
                continue
            raw_name = string_at(names + i * SOCKADDR_BYTES, namelen)
            out.append((string_at(self._buffer_addresses[i], msgs[i].msg_len), _decode_sockaddr(raw_name)))
        return out


class MmsgSender:
    """Queues datagrams and sends them with as few sendmmsg calls as possible."""

    def __init__(self, batch: int = BATCH) -> None:
        self.batch = batch
        self._iov = (_Iovec * batch)()
        self._msgs = (_Mmsghdr * batch)()
        for i in range(batch):
            hdr = self._msgs[i].msg_hdr
            hdr.msg_iov = ctypes.pointer(self._iov[i])
            hdr.msg_iovlen = 1
        self._queue: list[tuple[bytes, ctypes.Array[ctypes.c_char]]] = []
        self._names: dict[Address, ctypes.Array[ctypes.c_char]] = {}
        self.sent = 0
        self.failed = 0

    def __len__(self) -> int:
        return len(self._queue)

    def _sockaddr(self, address: Address) -> ctypes.Array[ctypes.c_char]:
        name = self._names.get(address)
        if name is None:
            if len(self._names) >= MAX_CACHED_ADDRESSES:
                del self._names[next(iter(self._names))]
            name = ctypes.create_string_buffer(_encode_sockaddr(address))
            self._names[address] = name
        return name

    def add(self, data: bytes, address: Address) -> None:
        self._queue.append((data, self._sockaddr((address[0], address[1]))))

    def flush(self, fd: int) -> None:
        """Send everything queued; datagrams the kernel refuses are counted and dropped (UDP)."""
        assert _FUNCTIONS is not None
        queue, self._queue = self._queue, []
        msgs, iov, sendmmsg = self._msgs, self._iov, _FUNCTIONS[1]
        start = 0
        while start < len(queue):
            chunk = queue[start : start + self.batch]
            for i, (data, name) in enumerate(chunk):
                # c_char_p(data) points at the bytes object's own buffer: no copy.
                iov[i].iov_base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
                iov[i].iov_len = len(data)
                hdr = msgs[i].msg_hdr
                hdr.msg_name = ctypes.addressof(name)
                hdr.msg_namelen = len(name) - 1  # create_string_buffer adds a NUL
            n = sendmmsg(fd, msgs, len(chunk), 0)
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                # EAGAIN (socket buffer full) or an error for the first datagram: drop it, go on.
                self.failed += 1
                start += 1
                continue
            self.sent += n
            if n < len(chunk):
                # sendmmsg stops at the first datagram that fails: count it, skip it, go on.
                self.failed += 1
                n += 1
            start += n


class BatchedPort:
    """A UDP socket driven by recvmmsg/sendmmsg, offering the asyncio transport calls the LB uses."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.DatagramProtocol,
                 batch: int = BATCH) -> None:
        if _FUNCTIONS is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available on this platform")
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._receiver = MmsgReceiver(batch)
        self._sender = MmsgSender(batch)
        self._flush_pending = False
        self._closed = False
        protocol.connection_made(self)  # type: ignore[arg-type]
        loop.add_reader(self._fd, self._readable)

    # -- receive --------------------------------------------------------------

    def _readable(self) -> None:
        deliver: Callable[[bytes, Address], None] = self._protocol.datagram_received
        for _ in range(MAX_BATCHES_PER_WAKEUP):
            try:
                batch = self._receiver.receive(self._fd)
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            for data, addr in batch:
                deliver(data, addr)
            if len(batch) < self._receiver.batch:
                return

    # -- the asyncio.DatagramTransport surface the LB uses -------------------

    def sendto(self, data: bytes, addr: Address | None = None) -> None:
        if self._closed or addr is None:
            return
        self._sender.add(data, addr)
        if len(self._sender) >= self._sender.batch:
            self.flush()
        elif not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        if not self._closed and len(self._sender):
            self._sender.flush(self._fd)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._sock.getsockname()
        return default

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._sock.close()
        self._protocol.connection_lost(None)

    def abort(self) -> None:
        self.close()

    @property
    def stats(self) -> dict[str, int]:
        return {"sent": self._sender.sent, "send_failed": self._sender.failed,
                "truncated": self._receiver.truncated}


async def open_datagram_port(
    sock: socket.socket, factory: Callable[[], asyncio.DatagramProtocol], io: str
) -> tuple[asyncio.DatagramTransport, asyncio.DatagramProtocol]:
    """``io="asyncio"``: the event loop's own endpoint; ``io="batched"``: a :class:`BatchedPort`."""
    loop = asyncio.get_running_loop()
    if io == "batched":
        protocol = factory()
        port = BatchedPort(loop, sock, protocol)
        return port, protocol  # type: ignore[return-value]  # duck-typed transport
    transport, proto = await loop.create_datagram_endpoint(factory, sock=sock)
    return transport, proto
