"""The return half of the batched datapath: backend replies in on the inside socket, payloads out from their VIP.

Per batch: the sender's sockaddr and the reply's PROXY header bytes are looked
up in a cache of headers the :class:`~lb.core.return_path.ReturnPath` already
accepted from that sender; misses, and everything with TLVs, take
``ReturnPath.handle`` (every check, every counter). The cache is keyed by the
exact bytes, so a hit repeats a decision the return path made on identical
input, and it is dropped whenever the return path is reconfigured or a VIP
socket opens or closes. Each payload leaves from its VIP's socket with one
iovec pointing past the header in the receive slot: nothing is copied.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
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

if TYPE_CHECKING:
    from lb.adapters.mmsg_datapath import MmsgDatapath
    from lb.adapters.mmsg_forward import MmsgVipPort

#: A validated reply header: (VIP port it leaves from, client sockaddr, header length, sender).
Accepted = tuple["MmsgVipPort", bytes, int, ReplySender]


class ReplyQueue:
    """Replies waiting to leave from one VIP socket: a sockaddr slot, an iovec and a header each."""

    def __init__(self) -> None:
        self.names = (ctypes.c_char * (SOCKADDR_BYTES * BATCH))()
        self.iov = (Iovec * BATCH)()
        self.send = SendArray()
        self.names_view = memoryview(self.names).cast("B")
        self.iov_words = word_view(self.iov)
        names_at, iov_at = ctypes.addressof(self.names), ctypes.addressof(self.iov)
        for j in range(BATCH):
            w = j * MSG_WORDS
            self.send.words[w] = names_at + j * SOCKADDR_BYTES
            self.send.words[w + 2] = iov_at + j * IOV_SIZE
            self.send.words[w + 3] = 1
        self.count = 0



class MmsgInsidePort:
    """The inside socket's receive side: replies validated (or looked up) and queued on their VIP ports."""

    def __init__(self, datapath: MmsgDatapath, sock: socket.socket, return_path: ReturnPath) -> None:
        self._datapath = datapath
        self.sock = sock
        self.fd = sock.fileno()
        self.ring = ReceiveRing()
        self.return_path = return_path
        # sender sockaddr -> reply header bytes -> what the return path decided for them
        self._accepted: dict[bytes, dict[bytes, Accepted]] = {}
        self._accepted_generation = -1
        self._accepted_size = 0
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
            self._accepted_size = 0
            self._accepted_generation = rp.generation
        accepted, view, slot = self._accepted, ring.view, ring.slot_bytes
        for _ in range(MAX_BATCHES_PER_WAKEUP):
            try:
                n, fields = ring.receive(self.fd)
            except OSError:
                count_into(self._datapath.socket_errors, "inside")
                return
            if n == 0:
                return
            self.rx += n
            fast = payload_bytes = 0
            queues: list[MmsgVipPort] = []
            for i in range(n):
                namelen, flags, length = fields[3 * i], fields[3 * i + 1], fields[3 * i + 2]
                if flags & MSG_TRUNC:
                    count_into(self.drops, "rx_truncated")
                    continue
                off = i * slot
                src = ring.source(i, namelen)
                by_header = accepted.get(src)
                entry = None
                if by_header is not None and length >= 28:
                    hlen = 52 if view[off + 13] == 0x22 else 28
                    if length >= hlen:
                        entry = by_header.get(bytes(view[off : off + hlen]))
                if entry is None:
                    entry = self._accept_slow(src, bytes(view[off : off + length]))
                    if entry is None:
                        continue
                else:
                    fast += 1
                    payload_bytes += length - entry[2]
                    if length > entry[2] and view[off + entry[2]] >= 0xC0:  # a handshake: the R-20 check
                        rp.check_reply_scid(entry[3], bytes(view[off + entry[2] : off + length]))
                port, client, hlen = entry[0], entry[1], entry[2]
                queue = port.reply
                j = queue.count
                if j == 0:
                    queues.append(port)
                queue.names_view[j * SOCKADDR_BYTES : j * SOCKADDR_BYTES + len(client)] = client
                queue.send.words[j * MSG_WORDS + 1] = len(client)
                queue.iov_words[2 * j] = ring.buffers_at + off + hlen
                queue.iov_words[2 * j + 1] = length - hlen
                queue.count = j + 1
            if fast:
                rp.count_sent(fast, payload_bytes)
            for port in queues:
                self._flush_replies(port)
            if n < ring.batch:
                return

    def _accept_slow(self, src: bytes, datagram: bytes) -> Accepted | None:
        """Full validation by the return path; an accepted header is remembered for its sender."""
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
        entry = (port, encode_sockaddr(decision.client), decision.offset, allowed[decision.vip])
        if decision.offset in (28, 52):  # headers with TLVs are validated every time
            if self._accepted_size >= MAX_CACHED:
                self._accepted.clear()
                self._accepted_size = 0
            self._accepted.setdefault(src, {})[datagram[: decision.offset]] = entry
            self._accepted_size += 1
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
