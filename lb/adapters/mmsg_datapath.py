"""The Linux datapath: recvmmsg batches, Router.route_batch, sendmmsg scatter-gather, no payload copies.

Forward (client -> backend), per batch of up to 64 datagrams on a VIP socket:

1. one ``recvmmsg`` into fixed receive slots (``ReceiveRing``);
2. one :meth:`Router.route_batch` over the slots (cache hits, the misses decoded
   together, fallbacks);
3. one ``sendmmsg`` from the inside socket. Each message is six iovecs, all but
   one fixed at start: the PROXY v2 preamble and the VIP's address and port
   (constants of the port), the client's address and port (pointing *into the
   sockaddr the kernel wrote for that slot*), and the payload (pointing into the
   receive slot; only its length changes). No header is built and no payload
   is copied in user space: per datagram, Python writes three words of the
   message header and one length.

Return (backend -> client), per batch on the inside socket: the sender's
sockaddr and the reply's PROXY header bytes are looked up in a cache of
headers the :class:`~lb.core.return_path.ReturnPath` already accepted from that
sender (misses, and everything else, take ``ReturnPath.handle``); the payload
leaves from the VIP's socket with one iovec pointing past the header in the
receive slot.

Every datagram ends in one counted outcome: the router's or the return
path's, or one of this adapter's drops (``rx_truncated``, ``tx_queue_full``,
``tx_reply_queue_full``) or send errors (``backend_unreachable``,
``tx_to_client_errors``). EAGAIN/ENOBUFS wait up to 1 ms for the socket to
drain, once per batch, then count what is left as dropped: the slots are
reused by the next batch, so nothing can wait longer without copying.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import select
import socket
from typing import cast

from lb.adapters.datapath import DatagramHandler, DatapathStats
from lb.adapters.mmsg import (
    BATCH,
    IOV_SIZE,
    LIBC,
    MSG_DONTWAIT,
    MSG_SIZE,
    MSG_TRUNC,
    MSG_WORDS,
    SOCKADDR_BYTES,
    SOCKADDR_IN6_BYTES,
    SOCKADDR_IN_BYTES,
    Iovec,
    ReceiveRing,
    SendArray,
    check_errno,
    decode_sockaddr,
    encode_sockaddr,
    word_view,
)
from lb.adapters.udp_socket import bind_udp
from lb.core.addresses import Address, normalize_address
from lb.core.encapsulation import PROXY_V2_SIGNATURE
from lb.core.outcomes import ByteSlicer, Outcome, RouteDecision
from lb.core.return_path import ReplySender, ReturnOutcome, ReturnPath
from lb.core.router import Router
from lb.core.service_table import ServiceTable

#: Batches drained per readiness callback before other sockets get a turn.
MAX_BATCHES_PER_WAKEUP = 8
#: How long a full socket buffer may hold a batch before what is left is dropped.
SEND_WAIT_SECONDS = 0.001
#: Bound of the sockaddr caches (client addresses, accepted reply headers).
MAX_CACHED = 65536
_RETRYABLE = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)


def _wait_writable(fd: int, seconds: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(seconds * 1000))


def _count(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


class _Destinations:
    """Backend address -> (pointer to its sockaddr, its length); the buffers live as long as this."""

    def __init__(self) -> None:
        self.by_address: dict[Address, tuple[int, int]] = {}
        self.by_pointer: dict[int, Address] = {}
        self._buffers: list[ctypes.Array[ctypes.c_char]] = []

    def add(self, address: Address) -> tuple[int, int]:
        raw = encode_sockaddr(normalize_address(address))
        buf = ctypes.create_string_buffer(raw, SOCKADDR_BYTES)
        self._buffers.append(buf)
        entry = self.by_address[address] = (ctypes.addressof(buf), len(raw))
        self.by_pointer[entry[0]] = address
        return entry


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
        # PROXY v2 preamble: signature, version 2 / PROXY, INET(6) / DGRAM, length of the address block.
        preamble = PROXY_V2_SIGNATURE + (b"\x21\x22\x00\x24" if v6 else b"\x21\x12\x00\x0c")
        self._consts = ctypes.create_string_buffer(preamble + ip + port.to_bytes(2, "big"))
        consts = ctypes.addressof(self._consts)
        ip_len, ip_at = len(ip), (8 if v6 else 4)  # sin6_addr / sin_addr inside the sockaddr
        self._iov = (Iovec * (6 * ring.batch))()
        for i in range(ring.batch):
            name = ring.names_at + i * SOCKADDR_BYTES
            for k, (base, length) in enumerate((
                (consts, 16), (name + ip_at, ip_len), (consts + 16, ip_len), (name + 2, 2),
                (consts + 16 + ip_len, 2), (ring.buffers_at + i * ring.slot_bytes, 0),
            )):
                self._iov[6 * i + k].iov_base = base
                self._iov[6 * i + k].iov_len = length
        self._iov_words = word_view(self._iov)
        iov_at = ctypes.addressof(self._iov)
        self._iov_ptrs = [iov_at + 6 * i * IOV_SIZE for i in range(ring.batch)]
        self.send = SendArray()
        # Every forward leaves from the inside socket, so every destination has its family's
        # sockaddr length; a backend of the other family fails with EINVAL and is counted.
        assert datapath.inside is not None, "open_inside before open_vip"
        namelen = SOCKADDR_IN6_BYTES if datapath.inside.family == socket.AF_INET6 else SOCKADDR_IN_BYTES
        for j in range(ring.batch):
            self.send.words[j * MSG_WORDS + 1] = namelen  # msg_namelen
            self.send.words[j * MSG_WORDS + 3] = 6  # msg_iovlen
        self._send_ptr = self.send.pointers[0]
        # backend label -> pointer to its sockaddr, for the table it was built from
        self._dests: dict[str, int] = {}
        self._dest_labels: dict[int, str] = {}
        self._dest_table: object = None
        self._clients: dict[bytes, Address] = {}
        self._fields: tuple[int, ...] = ()
        # The reply side: replies leave from this socket, one iovec each, names written per reply.
        self.reply = _ReplyQueue()
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
        raw = self.ring.source(i, self._fields[3 * i])
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
        msgs_ptr, fields_of, msg_bytes, pristine = ring.msgs_ptr, ring.fields, ring.msg_bytes, ring.pristine
        words, iov_words, iov_ptrs, send_ptr = self.send.words, self._iov_words, self._iov_ptrs, self._send_ptr
        inside_fd, client_at = self._datapath.inside_fd, self._client_at
        for _ in range(MAX_BATCHES_PER_WAKEUP):
            n = recvmmsg(fd, msgs_ptr, batch, MSG_DONTWAIT, null)
            if n <= 0:
                if n < 0:
                    self._receive_failed()
                return
            self._fields = fields = fields_of[n](msg_bytes)
            msg_bytes[: n * MSG_SIZE] = pristine[: n * MSG_SIZE]  # the kernel wrote namelen, flags, len
            self.rx += n
            lengths = fields[2::3]
            if max(fields[1::3]) & MSG_TRUNC:  # cannot happen with 64 KiB slots; counted if it does
                decisions = self._route_untruncated(fields)
            else:
                decisions = router.route_batch(view, slot, lengths, client_at, raw)
            if router.table is not self._dest_table:
                self._refresh_destinations(router.table)
            dests = self._dests
            j = 0
            for i in range(n):
                backend = decisions[i][1]
                if backend is None:
                    continue
                w = j << 3  # MSG_WORDS
                words[w] = dests[backend.label]
                words[w + 2] = iov_ptrs[i]
                iov_words[12 * i + 11] = lengths[i]
                j += 1
            if j and sendmmsg(inside_fd, send_ptr, j, 0) != j:
                self._flush(j)  # partly sent or refused: find out which, count the rest
            if n < batch:
                return

    def _receive_failed(self) -> None:
        try:
            check_errno("recvmmsg")
        except OSError:
            _count(self._datapath.socket_errors, "vip")

    def _route_untruncated(self, fields: tuple[int, ...]) -> list[RouteDecision]:
        """The rare batch with a cut datagram: count those as the adapter's drop, route the others one by one."""
        decisions: list[RouteDecision] = []
        view, slot = self.ring.view, self.ring.slot_bytes
        for i in range(len(fields) // 3):
            if fields[3 * i + 1] & MSG_TRUNC:
                _count(self.drops, "rx_truncated")
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
            if err in _RETRYABLE:
                if not waited and _wait_writable(fd, SEND_WAIT_SECONDS):
                    waited = True
                    continue
                for k in range(start, count):
                    self._not_sent(k, None)
                return
            self._not_sent(start, err)
            start += 1

    def _not_sent(self, entry: int, err: int | None) -> None:
        label = self._dest_labels.get(self.send.words[entry * MSG_WORDS], "?")
        _count(self.not_sent, label)
        if err is None:
            _count(self.drops, "tx_queue_full")
        else:
            _count(self.unreachable, label)


class _ReplyQueue:
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


class MmsgDatapath:
    """The batched datapath of one LB process (see the module header); implements ``Datapath``."""

    def __init__(self) -> None:
        self.ports: dict[Address, MmsgVipPort] = {}
        self._retired_ports: list[MmsgVipPort] = []
        self._dest = _Destinations()
        self.inside: socket.socket | None = None
        self.inside_fd = -1
        self._inside_ring: ReceiveRing | None = None
        self._return_path: ReturnPath | None = None
        # sender sockaddr -> reply header bytes -> (port, client sockaddr, header length, sender)
        self._accepted: dict[bytes, dict[bytes, tuple[MmsgVipPort, bytes, int, ReplySender]]] = {}
        self._accepted_generation = -1
        self._accepted_size = 0
        self._probe_transports: list[asyncio.DatagramTransport] = []
        self.rx_backend = 0
        self.tx_to_client_errors = 0
        self.drops: dict[str, int] = {}
        self.socket_errors: dict[str, int] = {}

    # -- the Datapath interface -----------------------------------------------------

    async def open_inside(self, address: Address, return_path: ReturnPath) -> None:
        self.inside = bind_udp(address)
        self.inside_fd = self.inside.fileno()
        self._inside_ring = ReceiveRing()
        self._return_path = return_path
        asyncio.get_running_loop().add_reader(self.inside_fd, self._inside_readable)

    async def open_vip(self, service: str, vip: Address, router: Router) -> MmsgVipPort:
        port = MmsgVipPort(self, service, bind_udp(vip), normalize_address(vip), router)
        old = self.ports.get(port.vip)
        if old is not None:  # a moved-back VIP: the new socket takes over
            self.retire(old)
        self.ports[port.vip] = port
        self._accepted_generation = -1
        return port

    async def open_probe(self, host: str, on_datagram: DatagramHandler) -> _ProbePort:
        loop = asyncio.get_running_loop()
        sock = bind_udp((host, 0), reuse_port=False)
        transport, _ = await loop.create_datagram_endpoint(lambda: _ProbeProtocol(on_datagram, self), sock=sock)
        self._probe_transports.append(transport)
        return _ProbePort(transport, normalize_address(sock.getsockname()[:2]))

    def send_probe(self, datagram: bytes, backend: Address) -> None:
        assert self.inside is not None
        self.inside.sendto(datagram, backend)

    def retire(self, port: MmsgVipPort) -> None:
        """Close one VIP socket; its counters stay in :meth:`stats`."""
        if self.ports.get(port.vip) is port:
            del self.ports[port.vip]
        if port.fd >= 0:
            asyncio.get_running_loop().remove_reader(port.fd)
            port.sock.close()
            port.fd = -1
            self._retired_ports.append(port)
        self._accepted_generation = -1

    def close(self) -> None:
        for port in list(self.ports.values()):
            self.retire(port)
        if self.inside is not None and self.inside_fd >= 0:
            asyncio.get_running_loop().remove_reader(self.inside_fd)
            self.inside.close()
            self.inside_fd = -1
        for transport in self._probe_transports:
            transport.close()

    def stats(self) -> DatapathStats:
        drops: dict[str, int] = dict(self.drops)
        tx: dict[tuple[str, str], int] = {}
        unreachable: dict[tuple[str, str], int] = {}
        rx = 0
        routers: dict[int, tuple[str, Router]] = {}
        for port in [*self._retired_ports, *self.ports.values()]:
            rx += port.rx
            routers[id(port.router)] = (port.service, port.router)
            for reason, n in port.drops.items():
                _count(drops, reason, n)
            for label, n in port.unreachable.items():
                unreachable[(port.service, label)] = unreachable.get((port.service, label), 0) + n
            for label, n in port.not_sent.items():
                tx[(port.service, label)] = tx.get((port.service, label), 0) - n
        for service, router in routers.values():  # a moved VIP keeps its router: count it once
            stats = router.stats()
            for (_, label), n in stats.cid_routed.items():
                tx[(service, label)] = tx.get((service, label), 0) + n
            for label, n in stats.fallback_routed.items():
                tx[(service, label)] = tx.get((service, label), 0) + n
        rp = self._return_path
        sent = (rp.tx if rp is not None else 0) - self.tx_to_client_errors - drops.get("tx_reply_queue_full", 0)
        return DatapathStats(
            rx_client_datagrams=rx, rx_backend_datagrams=self.rx_backend, tx_to_backend=tx,
            backend_unreachable=unreachable, tx_to_client=sent, tx_to_client_errors=self.tx_to_client_errors,
            drops=drops, socket_errors=dict(self.socket_errors),
        )

    # -- forwarding helpers -----------------------------------------------------------

    def destination(self, address: Address) -> int:
        """Pointer to the sockaddr of ``address`` (made once per address, kept for the process)."""
        entry = self._dest.by_address.get(address)
        return (entry or self._dest.add(address))[0]

    # -- the return path ----------------------------------------------------------------

    def _inside_readable(self) -> None:
        ring, rp = self._inside_ring, self._return_path
        assert ring is not None and rp is not None
        if self._accepted_generation != rp.generation:
            self._accepted.clear()
            self._accepted_size = 0
            self._accepted_generation = rp.generation
        accepted, view, slot = self._accepted, ring.view, ring.slot_bytes
        for _ in range(MAX_BATCHES_PER_WAKEUP):
            try:
                n, fields = ring.receive(self.inside_fd)
            except OSError:
                _count(self.socket_errors, "inside")
                return
            if n == 0:
                return
            self.rx_backend += n
            fast = payload_bytes = 0
            queues: list[MmsgVipPort] = []
            for i in range(n):
                namelen, flags, length = fields[3 * i], fields[3 * i + 1], fields[3 * i + 2]
                if flags & MSG_TRUNC:
                    _count(self.drops, "rx_truncated")
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

    def _accept_slow(self, src: bytes, datagram: bytes) -> tuple[MmsgVipPort, bytes, int, ReplySender] | None:
        """Full validation by the return path; an accepted header is remembered for its sender."""
        rp = self._return_path
        assert rp is not None
        source = decode_sockaddr(src)
        decision = rp.handle(datagram, source)
        if decision.outcome is not ReturnOutcome.TO_CLIENT:
            return None
        assert decision.vip is not None and decision.client is not None
        port = self.ports.get(decision.vip)
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
            if err in _RETRYABLE:
                if not waited and _wait_writable(port.fd, SEND_WAIT_SECONDS):
                    waited = True
                    continue
                _count(self.drops, "tx_reply_queue_full", count - start)
                return
            self.tx_to_client_errors += 1
            start += 1


class _ProbeProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: DatagramHandler, datapath: MmsgDatapath) -> None:
        self._on_datagram = on_datagram
        self._datapath = datapath

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._on_datagram(data, normalize_address(addr))

    def error_received(self, exc: Exception) -> None:
        _count(self._datapath.socket_errors, "probe")


class _ProbePort:
    def __init__(self, transport: asyncio.DatagramTransport, address: Address) -> None:
        self._transport = transport
        self._address = address

    @property
    def address(self) -> Address:
        return self._address

    def close(self) -> None:
        self._transport.close()


assert MSG_SIZE == 8 * MSG_WORDS
