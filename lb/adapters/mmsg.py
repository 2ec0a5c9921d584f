"""recvmmsg/sendmmsg through ctypes: message arrays preallocated once, fields read and written by views.

CPython's socket module has ``recvmsg`` but no ``recvmmsg``/``sendmmsg``, and
one system call per datagram costs as much as all the Python routing work
together. This module owns the C structures and nothing else: the datapath
(``lb.adapters.mmsg_datapath``) decides what goes in them.

Speed rules, because everything here runs per datagram or per batch:

* ctypes attribute access costs ~100 ns; every per-datagram field is written
  through a ``memoryview`` cast to machine words (``Q``/``I``) over the same
  memory (~30 ns per item), and per-batch fields are read with one ``struct``
  call per batch size.
* Addresses and buffers never move: a message header points at a fixed slot,
  so most fields are written once at construction.
"""

from __future__ import annotations

import ctypes
import errno
import select
import socket
import struct
import sys
from typing import Any

from lb.core.addresses import Address

#: Datagrams per recvmmsg/sendmmsg call.
BATCH = 64
#: A receive slot holds the largest UDP payload (65,507 bytes over IPv4, 65,527 over IPv6, RFC 768/8200),
#: so no datagram is ever cut; the kernel touches only the bytes it writes, so unused slot memory
#: costs address space, not RSS.
SLOT_BYTES = 65536
#: sockaddr_storage is 128 bytes on Linux.
SOCKADDR_BYTES = 128
SOCKADDR_IN_BYTES = 16
SOCKADDR_IN6_BYTES = 28

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20

#: Batches drained per readiness callback before other sockets get a turn.
MAX_BATCHES_PER_WAKEUP = 8
#: How long a full socket buffer may hold a batch before what is left is dropped: the slots
#: are reused by the next batch, so nothing can wait longer without copying.
SEND_WAIT_SECONDS = 0.001
#: Bound of the address caches (client sockaddrs, accepted reply headers).
MAX_CACHED = 65536
#: Send errors that mean "the socket buffer is full": wait once, then count the rest as dropped.
RETRYABLE = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)

if sys.byteorder != "little" or struct.calcsize("P") != 8:  # the word views below assume LP64 little-endian
    raise ImportError("lb.adapters.mmsg supports 64-bit little-endian Linux only")


class Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class Msghdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", Msghdr), ("msg_len", ctypes.c_uint))


MSG_SIZE = ctypes.sizeof(Mmsghdr)  # 64 on LP64
MSG_WORDS = MSG_SIZE // 8
IOV_SIZE = ctypes.sizeof(Iovec)  # 16
# Word (8-byte) indices of the fields inside one mmsghdr, for the ``Q`` views.
NAME_W = Msghdr.msg_name.offset // 8  # 0
NAMELEN_W = Msghdr.msg_namelen.offset // 8  # 1 (u32 + 4 bytes of padding: written as a whole word)
IOV_W = Msghdr.msg_iov.offset // 8  # 2
IOVLEN_W = Msghdr.msg_iovlen.offset // 8  # 3
assert MSG_SIZE == 64 and IOV_SIZE == 16 and (NAME_W, NAMELEN_W, IOV_W, IOVLEN_W) == (0, 1, 2, 3)


class _Libc:
    """recvmmsg and sendmmsg through cffi's ABI mode.

    cffi (already a dependency of ``cryptography``) calls a C function for about
    two thirds of what ctypes charges, and the datapath makes two calls per
    batch whatever the batch size: at a few datagrams per wakeup that is a
    visible share of the Python time per datagram.
    """

    def __init__(self) -> None:
        import cffi  # noqa: PLC0415 - only where the batched datapath is used

        self.ffi = cffi.FFI()
        self.ffi.cdef(
            "int recvmmsg(int, void *, unsigned int, int, void *);"
            "int sendmmsg(int, void *, unsigned int, int);"
        )
        lib = self.ffi.dlopen(None)
        self.recvmmsg = lib.recvmmsg
        self.sendmmsg = lib.sendmmsg
        self.null = self.ffi.NULL

    def pointer(self, address: int) -> Any:
        return self.ffi.cast("void *", address)

    @property
    def errno(self) -> int:
        return int(self.ffi.errno)


def _load_libc() -> _Libc | None:
    try:
        return _Libc()
    except (ImportError, OSError, AttributeError):
        return None


LIBC = _load_libc()


def mmsg_available() -> bool:
    """True where libc has recvmmsg and sendmmsg (Linux) and cffi loads."""
    return LIBC is not None


def word_view(array: ctypes.Array[Any]) -> memoryview:
    """The array's memory as unsigned 64-bit words (``Q``), writable."""
    return byte_view(array).cast("Q")


def byte_view(array: ctypes.Array[Any]) -> memoryview:
    return memoryview((ctypes.c_char * ctypes.sizeof(array)).from_buffer(array)).cast("B")


def encode_sockaddr(address: Address) -> bytes:
    """sockaddr_in / sockaddr_in6 bytes for a (canonical IP text, port) pair."""
    host, port = address[0], address[1]
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host)
        return struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + bytes(4) + packed + bytes(4)
    packed = socket.inet_pton(socket.AF_INET, host)
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + packed + bytes(8)


def decode_sockaddr(raw: bytes) -> Address:
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


class ReceiveRing:
    """``batch`` receive slots of ``slot_bytes`` each, with their message headers, for one socket.

    After :meth:`receive`, datagram ``i`` is ``view[i * slot_bytes : i * slot_bytes + lengths[i]]``
    and its source sockaddr is ``names[i * SOCKADDR_BYTES :][:namelens[i]]``.
    """

    def __init__(self, batch: int = BATCH, slot_bytes: int = SLOT_BYTES) -> None:
        self.batch = batch
        self.slot_bytes = slot_bytes
        self.buffers = (ctypes.c_char * (slot_bytes * batch))()
        self.names = (ctypes.c_char * (SOCKADDR_BYTES * batch))()
        self._iov = (Iovec * batch)()
        self._msgs = (Mmsghdr * batch)()
        self.buffers_at = ctypes.addressof(self.buffers)
        self.names_at = ctypes.addressof(self.names)
        self._msgs_at = ctypes.addressof(self._msgs)
        for i in range(batch):
            self._iov[i].iov_base = self.buffers_at + i * slot_bytes
            self._iov[i].iov_len = slot_bytes
            hdr = self._msgs[i].msg_hdr
            hdr.msg_name = self.names_at + i * SOCKADDR_BYTES
            hdr.msg_namelen = SOCKADDR_BYTES
            hdr.msg_iov = ctypes.pointer(self._iov[i])
            hdr.msg_iovlen = 1
        assert LIBC is not None
        self.msgs_ptr = LIBC.pointer(self._msgs_at)
        self.view = byte_view(self.buffers).toreadonly()
        self.name_view = byte_view(self.names).toreadonly()
        self._msg_bytes = byte_view(self._msgs)
        # The kernel overwrites msg_namelen, msg_flags and msg_len: one copy of the pristine
        # headers restores a whole batch before the next call.
        self._pristine = bytes(self._msg_bytes)
        # (namelen, flags, len) of the first n messages, one struct per n.
        one = f"{Msghdr.msg_namelen.offset}xI{Msghdr.msg_flags.offset - Msghdr.msg_namelen.offset - 4}xi"
        one += f"{Mmsghdr.msg_len.offset - Msghdr.msg_flags.offset - 4}xI{MSG_SIZE - Mmsghdr.msg_len.offset - 4}x"
        self.fields = [struct.Struct("=" + one * n).unpack_from for n in range(batch + 1)]
        self.msg_bytes = self._msg_bytes
        self.pristine = self._pristine
        # msg_len of the first n messages, one struct per n (a fast path needs only the lengths).
        at = Mmsghdr.msg_len.offset
        self.lengths = [struct.Struct("=" + f"{at}xI{MSG_SIZE - at - 4}x" * n).unpack_from for n in range(batch + 1)]
        self._namelen = struct.Struct("=I").unpack_from

    def namelen(self, i: int) -> int:
        """The sockaddr length the kernel wrote for message ``i`` of the last batch."""
        return int(self._namelen(self._msg_bytes, i * MSG_SIZE + Msghdr.msg_namelen.offset)[0])

    def receive(self, fd: int) -> tuple[int, tuple[int, ...]]:
        """One recvmmsg: (count, flat (namelen, flags, length) fields). Raises OSError on real errors.

        The datapath inlines this body in its per-batch loop; this method is the readable version.
        """
        assert LIBC is not None
        n = LIBC.recvmmsg(fd, self.msgs_ptr, self.batch, MSG_DONTWAIT, LIBC.null)
        if n <= 0:
            return 0, () if n == 0 else check_errno("recvmmsg")
        fields = self.fields[n](self._msg_bytes)
        self._msg_bytes[: n * MSG_SIZE] = self._pristine[: n * MSG_SIZE]
        return n, fields

    def source(self, i: int, namelen: int) -> bytes:
        return bytes(self.name_view[i * SOCKADDR_BYTES : i * SOCKADDR_BYTES + namelen])


def wait_writable(fd: int, seconds: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(seconds * 1000))


def count_into(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


def check_errno(call: str) -> tuple[()]:
    """After a failed receive: nothing for EAGAIN/EINTR, OSError for anything else."""
    assert LIBC is not None
    err = LIBC.errno
    if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
        return ()
    raise OSError(err, f"{call}: {errno.errorcode.get(err, err)}")


class SendArray:
    """``batch`` outgoing message headers; the caller points them at iovecs and names, then :meth:`send`."""

    def __init__(self, batch: int = BATCH) -> None:
        assert LIBC is not None
        self.batch = batch
        self.msgs = (Mmsghdr * batch)()
        self.at = ctypes.addressof(self.msgs)
        self.words = word_view(self.msgs)
        self.pointers = [LIBC.pointer(self.at + k * MSG_SIZE) for k in range(batch)]

    def send(self, fd: int, start: int, count: int) -> tuple[int, int]:
        """One sendmmsg of messages ``start .. start+count-1``: (sent, 0), or (0, errno) when the first fails.

        sendmmsg stops at the first message that fails and reports the error only
        when nothing was sent: callers retry from ``start + sent`` to learn it.
        """
        assert LIBC is not None
        while True:
            n = LIBC.sendmmsg(fd, self.pointers[start], count, 0)
            if n >= 0:
                return n, 0
            err = LIBC.errno
            if err != errno.EINTR:
                return 0, err
