"""The return half of the batched datapath: backend replies in on the inside socket, payloads out from their VIP.

Per batch: the sender's sockaddr and the reply's PROXY header bytes, together,
are looked up in a cache of what the :class:`~lb.core.return_path.ReturnPath`
decided for exactly those bytes; misses, and headers with TLVs, take
``ReturnPath.handle`` (every check, every counter). A hit repeats a decision
the return path made on identical input; the cache is dropped whenever the
return path is reconfigured or a VIP socket opens or closes. Each payload
leaves from its VIP's socket with one iovec pointing past the header in the
receive slot, and the message names a sockaddr the cache entry keeps: nothing
is copied.

When a whole batch hits the cache, comes from senders of one family, goes to
one VIP and holds no handshake (which the R-20 check must read), it is queued
by strided copies and ``map`` calls, with no Python bytecode per datagram.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
from array import array
from itertools import repeat
from operator import add, itemgetter, sub
from typing import TYPE_CHECKING

from lb.adapters.mmsg import (
    BATCH,
    IOV_SIZE,
    MAX_BATCHES_PER_WAKEUP,
    MAX_CACHED,
    MSG_TRUNC,
    MSG_WORDS,
    RETRYABLE,
    SEND_WAIT_SECONDS,
    SOCKADDR_BYTES,
    SOCKADDR_IN6_BYTES,
    SOCKADDR_IN_BYTES,
    Iovec,
    ReceiveRing,
    SendArray,
    count_into,
    decode_sockaddr,
    encode_sockaddr,
    wait_writable,
    word_view,
)
from lb.core.return_path import ReplySender, ReturnOutcome, ReturnPath
from lb.core.strided_unpack import StridedUnpack, strided_unpack

if TYPE_CHECKING:
    from lb.adapters.mmsg_datapath import MmsgDatapath
    from lb.adapters.mmsg_forward import MmsgVipPort

#: A validated reply: (VIP port it leaves from, pointer to the client's sockaddr, header length, sender).
Accepted = tuple["MmsgVipPort", int, int, ReplySender]
_PORT = itemgetter(0)
_CLIENT = itemgetter(1)
#: PROXY v2 header lengths without TLVs (INET, INET6): the only ones the cache holds.
_HEADER_LENGTHS = {0x12: 28, 0x22: 52}
#: First payload octets below 0xC0 (not a long header): deleting them leaves the handshakes (R-20).
_SHORT_HEADER_OCTETS = bytes(range(0xC0))


def _gather(cache: dict[tuple[int, int], StridedUnpack], length: int, count: int, stride: int) -> StridedUnpack:
    """The (cached) ``unpack_from`` of the first ``length`` bytes of ``count`` records ``stride`` apart."""
    gather = cache.get((length, count))
    if gather is None:
        gather = cache[(length, count)] = strided_unpack(0, length, count, stride)
    return gather


class ReplyQueue:
    """Replies waiting to leave from one VIP socket: message j sends iovec j to a cached sockaddr."""

    def __init__(self, v6: bool) -> None:
        self.iov = (Iovec * BATCH)()
        self.send = SendArray()
        self.iov_words = word_view(self.iov)
        iov_at = ctypes.addressof(self.iov)
        for j in range(BATCH):
            w = j * MSG_WORDS
            self.send.words[w + 1] = SOCKADDR_IN6_BYTES if v6 else SOCKADDR_IN_BYTES  # the VIP's family
            self.send.words[w + 2] = iov_at + j * IOV_SIZE
            self.send.words[w + 3] = 1
        self.count = 0


class MmsgInsidePort:
    """The inside socket's receive side: replies validated (or looked up) and queued on their VIP ports."""

    def __init__(self, datapath: MmsgDatapath, sock: socket.socket, return_path: ReturnPath) -> None:
        self._datapath = datapath
        self.sock = sock
        self.fd = sock.fileno()
        self.ring = ring = ReceiveRing()
        self.return_path = return_path
        # sender sockaddr + reply header bytes -> what the return path decided for them
        self._accepted: dict[bytes, Accepted] = {}
        self._client_buffers: list[ctypes.Array[ctypes.c_char]] = []  # the sockaddrs entries point at
        self._retired_buffers: list[ctypes.Array[ctypes.c_char]] = []
        self._accepted_generation = -1
        slot = ring.slot_bytes
        # (length, count) -> one struct's unpack_from gathering ``count`` fields of ``length`` bytes
        # at the start of each sockaddr / receive slot: a third of the cost of slicing each one.
        self._sources: dict[tuple[int, int], StridedUnpack] = {}
        self._headers: dict[tuple[int, int], StridedUnpack] = {}
        self._payload_bases = {h: array("Q", [ring.buffers_at + i * slot + h for i in range(ring.batch)])
                               for h in (28, 52)}
        self.rx = 0
        self.tx_to_client_errors = 0
        self.drops: dict[str, int] = {}
        asyncio.get_running_loop().add_reader(self.fd, self.readable)

    def forget_accepted(self) -> None:
        """VIP sockets changed: the cached decisions may point at a closed one."""
        self._accepted_generation = -1

    def close(self) -> None:
        if self.fd >= 0:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.sock.close()
            self.fd = -1

    def readable(self) -> None:
        ring, rp = self.ring, self.return_path
        if self._accepted_generation != rp.generation:
            self._accepted.clear()
            self._client_buffers.clear()
            self._accepted_generation = rp.generation
        for _ in range(MAX_BATCHES_PER_WAKEUP):
            try:
                n, fields = ring.receive(self.fd)
            except OSError:
                count_into(self._datapath.socket_errors, "inside")
                return
            if n == 0:
                return
            self.rx += n
            if not self._queue_all_cached(n, fields):
                self._queue_each(n, fields)
            self._retired_buffers = []  # sent: sockaddrs dropped from the cache can go now
            if n < ring.batch:
                return

    def _queue_all_cached(self, n: int, fields: tuple[int, ...]) -> bool:
        """The batch's replies queued without per-datagram Python, or False (nothing done) if not all fit."""
        ring, slot = self.ring, self.ring.slot_bytes
        namelens, lengths = fields[0::3], fields[2::3]
        namelen = namelens[0]
        end = n * slot
        # The first reply's PROXY family octet gives the header length; a reply of the other family
        # has other header bytes (the family octet is part of the key), so it misses below.
        hlen = _HEADER_LENGTHS.get(ring.view[13])
        if (hlen is None or namelen not in (SOCKADDR_IN_BYTES, SOCKADDR_IN6_BYTES) or namelens.count(namelen) != n
                or min(lengths) < hlen or max(fields[1::3]) & MSG_TRUNC):
            return False
        sources = _gather(self._sources, namelen, n, SOCKADDR_BYTES)(ring.names)
        headers = _gather(self._headers, hlen, n, slot)(ring.buffers)
        entries = list(map(self._accepted.get, map(add, sources, headers)))
        # A miss, or a handshake to look at, or an empty reply (whose slot's first payload
        # octet is stale, so the handshake test cannot be read off the strided gather): one by one.
        if (None in entries or min(lengths) == hlen
                or bytes(ring.view[hlen:end:slot]).translate(None, _SHORT_HEADER_OCTETS)):
            return False
        ports = set(map(_PORT, entries))  # type: ignore[arg-type]  # no None: checked above
        if len(ports) != 1:
            return False
        port = ports.pop()
        queue = port.reply
        queue.send.words[0 : n * MSG_WORDS : MSG_WORDS] = array("Q", map(_CLIENT, entries))  # type: ignore[arg-type]
        queue.iov_words[0 : 2 * n : 2] = self._payload_bases[hlen][:n]
        queue.iov_words[1 : 2 * n : 2] = array("Q", map(sub, lengths, repeat(hlen)))
        queue.count = n
        self.return_path.count_sent(n, sum(lengths) - n * hlen)
        self._flush_replies(port)
        return True

    def _queue_each(self, n: int, fields: tuple[int, ...]) -> None:
        """One by one: cache lookups, the return path for misses, the R-20 check for handshakes."""
        ring, rp, accepted = self.ring, self.return_path, self._accepted
        view, slot = ring.view, ring.slot_bytes
        fast = payload_bytes = 0
        queues: list[MmsgVipPort] = []
        for i in range(n):
            namelen, flags, length = fields[3 * i], fields[3 * i + 1], fields[3 * i + 2]
            if flags & MSG_TRUNC:
                count_into(self.drops, "rx_truncated")
                continue
            off = i * slot
            src = ring.source(i, namelen)
            entry = None
            if length >= 28:
                hlen = _HEADER_LENGTHS.get(view[off + 13], 0)
                if hlen and length >= hlen:
                    entry = accepted.get(src + bytes(view[off : off + hlen]))
            if entry is None:
                entry = self._accept_slow(src, bytes(view[off : off + length]))
                if entry is None:
                    continue
            else:
                fast += 1
                payload_bytes += length - entry[2]
                if length > entry[2] and view[off + entry[2]] >= 0xC0:  # a handshake: the R-20 check
                    rp.check_reply_scid(entry[3], bytes(view[off + entry[2] : off + length]))
            port, hlen = entry[0], entry[2]
            queue = port.reply
            j = queue.count
            if j == 0:
                queues.append(port)
            queue.send.words[j * MSG_WORDS] = entry[1]
            queue.iov_words[2 * j] = ring.buffers_at + off + hlen
            queue.iov_words[2 * j + 1] = length - hlen
            queue.count = j + 1
        if fast:
            rp.count_sent(fast, payload_bytes)
        for port in queues:
            self._flush_replies(port)

    def _accept_slow(self, src: bytes, datagram: bytes) -> Accepted | None:
        """Full validation by the return path; an accepted header is remembered with its sender."""
        rp = self.return_path
        source = decode_sockaddr(src)
        decision = rp.handle(datagram, source)
        if decision.outcome is not ReturnOutcome.TO_CLIENT:
            return None
        assert decision.vip is not None and decision.client is not None
        port = self._datapath.ports.get(decision.vip)
        if port is None:  # the VIP went away between the return path's tables and this socket
            self.tx_to_client_errors += 1
            return None
        allowed = rp.sender(source)
        assert allowed is not None
        client = ctypes.create_string_buffer(encode_sockaddr(decision.client), SOCKADDR_BYTES)
        if len(self._client_buffers) >= MAX_CACHED:  # bounded: start again rather than grow,
            self._accepted.clear()  # but keep the old sockaddrs alive until this batch is sent
            self._retired_buffers, self._client_buffers = self._client_buffers, []
        self._client_buffers.append(client)
        entry = (port, ctypes.addressof(client), decision.offset, allowed[decision.vip])
        if decision.offset in (28, 52):  # headers with TLVs are validated every time
            self._accepted[src + datagram[: decision.offset]] = entry
        return entry

    def _flush_replies(self, port: MmsgVipPort) -> None:
        queue = port.reply
        count, queue.count = queue.count, 0
        start, waited = 0, False
        while start < count:
            sent, err = queue.send.send(port.fd, start, count - start)
            start += sent
            if not err:
                continue
            if err in RETRYABLE:
                if not waited and wait_writable(port.fd, SEND_WAIT_SECONDS):
                    waited = True
                    continue
                count_into(self.drops, "tx_reply_queue_full", count - start)
                return
            self.tx_to_client_errors += 1
            start += 1
