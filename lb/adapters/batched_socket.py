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

from lb.core.addresses import Address

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


def _raw_view(array: ctypes.Array[Any]) -> memoryview:
    """A writable byte view of a ctypes array: fields are then read and written with struct,
    which costs a fraction of ctypes attribute access (this is the per-datagram path)."""
    return memoryview((ctypes.c_char * ctypes.sizeof(array)).from_buffer(array)).cast("B")


_MSG_SIZE = ctypes.sizeof(_Mmsghdr)
_NAMELEN_AT = _Msghdr.msg_namelen.offset
_FLAGS_AT = _Msghdr.msg_flags.offset
_LEN_AT = _Mmsghdr.msg_len.offset
_U32 = struct.Struct("=I")


def _fields_struct(batch: int) -> struct.Struct:
    """Reads (namelen, flags, len) of ``batch`` consecutive mmsghdrs in one call."""
    one = (f"{_NAMELEN_AT}xI{_FLAGS_AT - _NAMELEN_AT - 4}xi{_LEN_AT - _FLAGS_AT - 4}xI"
           f"{_MSG_SIZE - _LEN_AT - 4}x")
    return struct.Struct("=" + one * batch)


class MmsgReceiver:
    """Preallocated recvmmsg state for ``batch`` datagrams of up to ``buffer_bytes`` each."""

    def __init__(self, batch: int = BATCH, buffer_bytes: int = BUFFER_BYTES) -> None:
        self.batch = batch
        self._buffers = (ctypes.c_char * (buffer_bytes * batch))()
        self._names = (ctypes.c_char * (SOCKADDR_BYTES * batch))()
        self._iov = (_Iovec * batch)()
        self._msgs = (_Mmsghdr * batch)()
        base, names = ctypes.addressof(self._buffers), ctypes.addressof(self._names)
        for i in range(batch):
            self._iov[i].iov_base = base + i * buffer_bytes
            self._iov[i].iov_len = buffer_bytes
            hdr = self._msgs[i].msg_hdr
            hdr.msg_name = names + i * SOCKADDR_BYTES
            hdr.msg_namelen = SOCKADDR_BYTES
            hdr.msg_iov = ctypes.pointer(self._iov[i])
            hdr.msg_iovlen = 1
        self._buffer_bytes = buffer_bytes
        self._buf_view = _raw_view(self._buffers)
        self._name_view = _raw_view(self._names)
        self._msg_view = _raw_view(self._msgs)
        self._fields = _fields_struct(batch)
        self._addresses: dict[bytes, Address] = {}  # raw sockaddr -> (ip, port), bounded
        self.truncated = 0

    def receive(self, fd: int) -> list[tuple[bytes, Address]]:
        """One recvmmsg call: the datagrams waiting (possibly none). Raises OSError on real errors."""
        assert _FUNCTIONS is not None
        n = _FUNCTIONS[0](fd, self._msgs, self.batch, MSG_DONTWAIT, None)
        if n <= 0:
            if n == 0:
                return []
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return []
            raise OSError(err, f"recvmmsg: {errno.errorcode.get(err, err)}")
        fields = self._fields.unpack_from(self._msg_view)
        buf, names, msgs, size = self._buf_view, self._name_view, self._msg_view, self._buffer_bytes
        addresses = self._addresses
        pack_u32 = _U32.pack_into
        out = []
        for i in range(n):
            namelen, flags, length = fields[3 * i], fields[3 * i + 1], fields[3 * i + 2]
            pack_u32(msgs, i * _MSG_SIZE + _NAMELEN_AT, SOCKADDR_BYTES)  # the kernel overwrote it
            if flags & MSG_TRUNC:
                self.truncated += 1
                continue
            raw = bytes(names[i * SOCKADDR_BYTES : i * SOCKADDR_BYTES + namelen])
            addr = addresses.get(raw)
            if addr is None:
                if len(addresses) >= MAX_CACHED_ADDRESSES:
                    addresses.clear()
                addr = addresses[raw] = _decode_sockaddr(raw)
            out.append((bytes(buf[i * size : i * size + length]), addr))
        return out


class MmsgSender:
    """Copies queued datagrams into preallocated slots and sends them with one sendmmsg per batch.

    Copying a datagram (~1.3 kB) into its slot costs less than pinning the
    Python object's buffer through ctypes, and leaves the message headers fixed
    except for two lengths.
    """

    def __init__(self, batch: int = BATCH, slot_bytes: int = BUFFER_BYTES + 128) -> None:
        self.batch = batch
        self._slot = slot_bytes
        self._buffers = (ctypes.c_char * (slot_bytes * batch))()
        self._names = (ctypes.c_char * (SOCKADDR_BYTES * batch))()
        self._iov = (_Iovec * batch)()
        self._msgs = (_Mmsghdr * batch)()
        base, names = ctypes.addressof(self._buffers), ctypes.addressof(self._names)
        for i in range(batch):
            self._iov[i].iov_base = base + i * slot_bytes
            hdr = self._msgs[i].msg_hdr
            hdr.msg_name = names + i * SOCKADDR_BYTES
            hdr.msg_iov = ctypes.pointer(self._iov[i])
            hdr.msg_iovlen = 1
        self._buf_view = _raw_view(self._buffers)
        self._name_view = _raw_view(self._names)
        self._iov_view = _raw_view(self._iov)
        self._msg_view = _raw_view(self._msgs)
        self._iov_len_at = _Iovec.iov_len.offset
        self._iov_size = ctypes.sizeof(_Iovec)
        self._size_t = struct.Struct("N")  # native size_t
        self._sockaddrs: dict[Address, bytes] = {}
        self._count = 0
        self.sent = 0
        self.failed = 0
        self.oversize = 0

    def __len__(self) -> int:
        return self._count

    def add(self, data: bytes, address: Address, fd: int) -> None:
        """Queue one datagram; sends the batch first when it is full."""
        if len(data) > self._slot:
            self.oversize += 1
            return
        if self._count == self.batch:
            self.flush(fd)
        key = (address[0], address[1])
        name = self._sockaddrs.get(key)
        if name is None:
            if len(self._sockaddrs) >= MAX_CACHED_ADDRESSES:
                self._sockaddrs.clear()
            name = self._sockaddrs[key] = _encode_sockaddr(key)
        i = self._count
        base = i * self._slot
        self._buf_view[base : base + len(data)] = data
        self._size_t.pack_into(self._iov_view, i * self._iov_size + self._iov_len_at, len(data))
        self._name_view[i * SOCKADDR_BYTES : i * SOCKADDR_BYTES + len(name)] = name
        _U32.pack_into(self._msg_view, i * _MSG_SIZE + _NAMELEN_AT, len(name))
        self._count = i + 1

    def flush(self, fd: int) -> None:
        """Send everything queued; datagrams the kernel refuses are counted and dropped (UDP)."""
        assert _FUNCTIONS is not None
        count, self._count = self._count, 0
        start = 0
        while start < count:
            # sendmmsg takes a pointer: offset into the preallocated header array.
            msgs = ctypes.cast(ctypes.addressof(self._msgs) + start * _MSG_SIZE, ctypes.POINTER(_Mmsghdr))
            n = _FUNCTIONS[1](fd, msgs, count - start, 0)
            if n < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                n = 0  # EAGAIN or an error for the first datagram: drop that one, go on
            self.sent += n
            if start + n < count:
                # sendmmsg stops at the first datagram that fails: count it, skip it.
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
        self._sender.add(data, addr, self._fd)
        if not self._flush_pending:
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
                "send_oversize": self._sender.oversize, "truncated": self._receiver.truncated}


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
