"""The forward half of the batched datapath: one VIP socket, client datagrams in, encapsulated forwards out.

Per batch of up to 64 datagrams: one ``recvmmsg`` into fixed receive slots,
one :meth:`Router.route_batch` over the slots, one ``sendmmsg`` from the
inside socket. Each message is two iovecs fixed at start: the slot's PROXY v2
header (preamble, VIP address and port written once; the client's address and
port copied in from the sockaddrs the kernel wrote, for the whole batch, by
strided memoryview copies) and the payload (pointing into the receive slot;
only its length changes). No payload is copied in user space: per datagram,
Python writes one word of a message header and one length. Two iovecs rather
than pointing into the sockaddrs directly (six): the kernel pays per iovec.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
from array import array
from operator import itemgetter
from typing import TYPE_CHECKING, cast

from lb.adapters.mmsg import (
    IOV_SIZE,
    LIBC,
    MAX_BATCHES_PER_WAKEUP,
    MAX_CACHED,
    MSG_DONTWAIT,
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
    byte_view,
    check_errno,
    count_into,
    decode_sockaddr,
    encode_sockaddr,
    wait_writable,
    word_view,
)
from lb.adapters.mmsg_return import ReplyQueue
from lb.core.addresses import Address, normalize_address
from lb.core.encapsulation import PROXY_V2_SIGNATURE
from lb.core.outcomes import ByteSlicer, Outcome, RouteDecision
from lb.core.router import Router
from lb.core.service_table import ServiceTable

if TYPE_CHECKING:
    from lb.adapters.mmsg_datapath import MmsgDatapath

_BACKEND = itemgetter(1)  # of a RouteDecision


class Destinations:
    """Backend address -> pointer to its sockaddr; the buffers live as long as this object."""

    def __init__(self) -> None:
        self._pointers: dict[Address, int] = {}
        self._buffers: list[ctypes.Array[ctypes.c_char]] = []

    def pointer(self, address: Address) -> int:
        pointer = self._pointers.get(address)
        if pointer is None:
            buf = ctypes.create_string_buffer(encode_sockaddr(normalize_address(address)), SOCKADDR_BYTES)
            self._buffers.append(buf)
            pointer = self._pointers[address] = ctypes.addressof(buf)
        return pointer


class MmsgVipPort:
    """One VIP socket: client datagrams in, encapsulated forwards out through the inside socket."""

    def __init__(self, datapath: MmsgDatapath, service: str, sock: socket.socket, vip: Address,
                 router: Router) -> None:
        self._datapath = datapath
        self.service = service
        self.sock = sock
        self.fd = sock.fileno()
        self._vip = vip
        self._router = router
        self.ring = ring = ReceiveRing()
        host, port = vip
        v6 = ":" in host
        ip = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, host)
        # PROXY v2: signature, version 2 / PROXY, INET(6) / DGRAM, length of the address block;
        # then client address, VIP address, client port, VIP port.
        preamble = PROXY_V2_SIGNATURE + (b"\x21\x22\x00\x24" if v6 else b"\x21\x12\x00\x0c")
        ip_len = len(ip)
        hlen = 16 + 2 * ip_len + 4  # 28 or 52: a multiple of 4, so u32 views line up
        template = preamble + bytes(ip_len) + ip + bytes(2) + port.to_bytes(2, "big")
        self._headers = ctypes.create_string_buffer(template * ring.batch, hlen * ring.batch)
        headers_at = ctypes.addressof(self._headers)
        # The copies of each batch, as (header view, names view) pairs of equal strided length:
        # the client's IP (u32 words at sin_addr / sin6_addr) and port (u16 at sin_port).
        names_u32 = ring.name_view.cast("I")
        names_u16 = ring.name_view.cast("H")
        headers = byte_view(self._headers)
        hdr_u32, hdr_u16 = headers.cast("I"), headers.cast("H")
        ip_word = 2 if v6 else 1  # sin6_addr at byte 8, sin_addr at byte 4
        self._copies = [
            (hdr_u32, 4 + k, hlen // 4, names_u32, ip_word + k, SOCKADDR_BYTES // 4) for k in range(ip_len // 4)
        ] + [(hdr_u16, (16 + 2 * ip_len) // 2, hlen // 2, names_u16, 1, SOCKADDR_BYTES // 2)]
        self._iov = (Iovec * (2 * ring.batch))()
        for i in range(ring.batch):
            self._iov[2 * i].iov_base = headers_at + i * hlen
            self._iov[2 * i].iov_len = hlen
            self._iov[2 * i + 1].iov_base = ring.buffers_at + i * ring.slot_bytes
        self._iov_words = word_view(self._iov)
        iov_at = ctypes.addressof(self._iov)
        self._iov_ptrs = [iov_at + 2 * i * IOV_SIZE for i in range(ring.batch)]
        self.send = SendArray()
        # Every forward leaves from the inside socket, so every destination has its family's
        # sockaddr length; a backend of the other family fails with EINVAL and is counted.
        assert datapath.inside is not None, "open_inside before open_vip"
        namelen = SOCKADDR_IN6_BYTES if datapath.inside.family == socket.AF_INET6 else SOCKADDR_IN_BYTES
        for j in range(ring.batch):
            self.send.words[j * MSG_WORDS + 1] = namelen  # msg_namelen
            self.send.words[j * MSG_WORDS + 2] = self._iov_ptrs[j]  # message j sends slot j ...
            self.send.words[j * MSG_WORDS + 3] = 2  # msg_iovlen
        self._slot_iov_ptrs = array("Q", self._iov_ptrs)
        self._compacted = False  # ... unless a batch with drops packed the later slots forward
        self._send_ptr = self.send.pointers[0]
        # backend label -> pointer to its sockaddr, for the table it was built from
        self._dests: dict[str, int] = {}
        self._dest_labels: dict[int, str] = {}
        self._dest_table: object = None
        self._clients: dict[bytes, Address] = {}
        # The reply side: replies leave from this socket, one iovec each, names written per reply.
        self.reply = ReplyQueue(v6)
        self.rx = 0
        self.not_sent: dict[str, int] = {}  # by backend label: refused or dropped forwards
        self.unreachable: dict[str, int] = {}
        self.drops: dict[str, int] = {}
        asyncio.get_running_loop().add_reader(self.fd, self.readable)

    @property
    def vip(self) -> Address:
        return self._vip

    @property
    def router(self) -> Router:
        return self._router

    def close(self) -> None:
        self._datapath.retire(self)

    def _client_at(self, i: int) -> Address:
        """The client address of datagram ``i`` of the current batch (only the fallback asks)."""
        raw = self.ring.source(i, self.ring.namelen(i))
        addr = self._clients.get(raw)
        if addr is None:
            if len(self._clients) >= MAX_CACHED:
                self._clients.clear()
            addr = self._clients[raw] = decode_sockaddr(raw)
        return addr

    def _refresh_destinations(self, table: ServiceTable) -> None:
        self._dests = {b.label: self._datapath.destination(b.address) for b in table.backends.values()}
        self._dest_labels = {pointer: label for label, pointer in self._dests.items()}
        self._dest_table = table

    def readable(self) -> None:
        """Drain the VIP socket: per batch one recvmmsg, one route_batch, one sendmmsg.

        The receive and send calls are inlined here rather than behind the ring's
        methods: at a few datagrams per wakeup, Python call overhead per batch is
        a visible part of the cost per datagram.
        """
        assert LIBC is not None
        ring, router = self.ring, self._router
        recvmmsg, sendmmsg, null = LIBC.recvmmsg, LIBC.sendmmsg, LIBC.null
        fd, batch, slot, view = self.fd, ring.batch, ring.slot_bytes, ring.view
        raw = cast(ByteSlicer, ring.buffers)  # a c_char array: its slices are bytes
        msgs_ptr, lengths_of, msg_bytes = ring.msgs_ptr, ring.lengths, ring.msg_bytes
        words, iov_words, iov_ptrs, send_ptr = self.send.words, self._iov_words, self._iov_ptrs, self._send_ptr
        inside_fd, client_at, copies = self._datapath.inside_fd, self._client_at, self._copies
        lb_replies = router.replies  # Retry and reset packets the router built, to send from the VIP
        for _ in range(MAX_BATCHES_PER_WAKEUP):
            n = recvmmsg(fd, msgs_ptr, batch, MSG_DONTWAIT, null)
            if n <= 0:
                if n < 0:
                    self._receive_failed()
                return
            # No headers to restore: the kernel writes msg_len and msg_flags (outputs only) and sets
            # msg_namelen to its family's sockaddr size, the same for every datagram of a socket.
            self.rx += n
            lengths = lengths_of[n](msg_bytes)
            if slot in lengths:  # a cut datagram fills its slot (MSG_TRUNC): not with 64 KiB slots
                decisions = self._route_untruncated(n)  # ... but counted if it does happen
            else:
                decisions = router.route_batch(view, slot, lengths, client_at, raw)
            if lb_replies.queue:
                self._send_lb_replies()
            if router.table is not self._dest_table:
                self._refresh_destinations(router.table)
            for dst, d0, dstep, src, s0, sstep in copies:  # the clients' addresses into the headers
                dst[d0 : d0 + dstep * n : dstep] = src[s0 : s0 + sstep * n : sstep]
            dests = self._dests
            backends = list(map(_BACKEND, decisions))
            if all(backends):  # not `None in`: that calls the dataclass's Python __eq__ per item
                # Every datagram forwarded (the steady state): message i sends slot i, so only the
                # destinations and the payload lengths change, written by two strided copies.
                if self._compacted:
                    words[2 : batch << 3 : 8] = self._slot_iov_ptrs
                    self._compacted = False
                words[0 : n << 3 : 8] = array("Q", [dests[b.label] for b in backends])
                iov_words[3 : 4 * n : 4] = array("Q", lengths)
                j = n
            else:
                # Some dropped: pack the forwarded ones to the front, each pointing at its own slot.
                self._compacted = True
                j = 0
                for i in range(n):
                    backend = backends[i]
                    if backend is None:
                        continue
                    w = j << 3  # MSG_WORDS
                    words[w] = dests[backend.label]
                    words[w + 2] = iov_ptrs[i]
                    iov_words[4 * i + 3] = lengths[i]
                    j += 1
            if j and sendmmsg(inside_fd, send_ptr, j, 0) != j:
                self._flush(j)  # partly sent or refused: find out which, count the rest
            if n < batch:
                return

    def _send_lb_replies(self) -> None:
        """Send the router's Retry and reset packets to their clients (rate-limited, a few per batch)."""
        for packet, client in self._router.replies.take():
            try:
                self.sock.sendto(packet, client)
            except OSError:
                count_into(self._datapath.socket_errors, "vip")

    def _receive_failed(self) -> None:
        try:
            check_errno("recvmmsg")
        except OSError:
            count_into(self._datapath.socket_errors, "vip")

    def _route_untruncated(self, n: int) -> list[RouteDecision]:
        """The rare batch with a cut datagram: count those as the adapter's drop, route the others one by one."""
        fields = self.ring.fields[n](self.ring.msg_bytes)
        decisions: list[RouteDecision] = []
        view, slot = self.ring.view, self.ring.slot_bytes
        for i in range(n):
            if fields[3 * i + 1] & MSG_TRUNC:
                count_into(self.drops, "rx_truncated")
                decisions.append((Outcome.MALFORMED_DROPPED, None))  # not a router outcome: never counted there
            else:
                def client(k: int, base: int = i) -> Address:
                    return self._client_at(base + k)

                datagram = bytes(view[i * slot : i * slot + fields[3 * i + 2]])
                decisions.append(self._router.route_batch(datagram, 0, [len(datagram)], client)[0])
        return decisions

    def _flush(self, count: int) -> None:
        """Send messages ``0 .. count-1`` again from the first unsent one, counting each refusal."""
        fd = self._datapath.inside_fd
        start, sent, waited = 0, 0, False
        while start < count:
            sent, err = self.send.send(fd, start, count - start)
            start += sent
            if not err:
                continue
            if err in RETRYABLE:
                if not waited and wait_writable(fd, SEND_WAIT_SECONDS):
                    waited = True
                    continue
                for k in range(start, count):
                    self._not_sent(k, None)
                return
            self._not_sent(start, err)
            start += 1

    def _not_sent(self, entry: int, err: int | None) -> None:
        label = self._dest_labels.get(self.send.words[entry * MSG_WORDS], "?")
        count_into(self.not_sent, label)
        if err is None:
            count_into(self.drops, "tx_queue_full")
        else:
            count_into(self.unreachable, label)
