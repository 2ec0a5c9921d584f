"""The stateless return path: backend replies in, (VIP, client, payload) out (design.md §4).

A backend sends each reply to the LB's inside address behind a PROXY v2
header whose *source* is the client (where the reply goes) and whose
*destination* is the VIP (which socket it leaves from). The LB needs no
lookup and no per-flow state, so any LB instance can return any reply.

Checks, in order; each failure is one counted reason and nothing is sent:

1. ``source``: the datagram comes from a configured backend address. The LB
   sends these payloads *from the VIP*, so an open inside port would make it a
   reflector (acceptance A-7, S-8).
2. The PROXY v2 header decodes (the decoder's reasons). The header is always
   the outermost bytes; nothing is ever parsed out of the payload.
3. ``unknown_vip``: the destination is a VIP this LB serves; ``foreign_vip``:
   it is the VIP of a service the sending backend is *not* configured in.
   Tenant isolation: a backend of service A must never emit from B's VIP.
4. The client is a unicast address a reply may go to: not port 0, not
   unspecified (``0.0.0.0``, ``::``), multicast or broadcast, and not one of
   the LB's own sockets (a reply "to" the VIP would re-enter the router as a
   client datagram).
5. Accepted. A long-header reply (a handshake) is also checked for a *stale
   configuration* (acceptance R-20): its SCID must decode, under the LB's
   configurations, to the sending backend's server ID; if not, the backend
   mints CIDs with a key or configuration the LB lacks and its clients' later
   datagrams would be unroutable. The reply is still delivered; the backend is
   flagged (``stale_config``) and counted (``stale_cid_replies``).

Health probes need no special case: the LB's health checker is just another
client (its own socket), so a probe's answer comes back through this path like
any reply. With several LB hosts behind ECMP that may be another LB's path:
each LB probes from its own unicast address (``quiclb run --probe-source``),
so whichever LB returns the answer sends it to the prober, and check 4 still
refuses the addresses that would loop (the VIPs and the inside address).

Sans-IO: ``handle`` takes bytes and the sender's address; the adapters send.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from lb.core.addresses import Address, normalize_address
from lb.core.cid_decoder import CidDecoder
from lb.core.encapsulation import decode_proxy_header_untrusted
from lb.core.quic_header import parse_routing_fields_untrusted
from lb.core.service_table import ServiceTable
from lb.errors import MalformedDatagram


class ReturnOutcome(enum.IntEnum):
    TO_CLIENT = 0
    REJECTED = 1


@dataclass(frozen=True)
class ReturnStats:
    rx_backend_datagrams: int
    tx_to_client: int
    tx_client_bytes: int
    rejected: Mapping[str, int]
    #: Long-header replies whose SCID does not decode to their sender, by (service, backend label).
    stale_cid_replies: Mapping[tuple[str, str], int] = field(default_factory=dict)
    #: Whether the last handshake reply of each backend was stale, by (service, backend label).
    stale_config: Mapping[tuple[str, str], bool] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReturnDecision:
    outcome: ReturnOutcome
    vip: Address | None = None
    client: Address | None = None
    payload: bytes = b""
    reason: str = ""
    #: Length of the PROXY header: the payload starts there in the received datagram.
    offset: int = 0


@dataclass(frozen=True, slots=True)
class ReplySender:
    """One (backend, service) pair: the backend may send replies from that service's VIP."""

    service: str
    server_id: bytes
    label: str
    decoder: CidDecoder


@lru_cache(maxsize=65536)
def client_address_problem(host: str) -> str | None:
    """Why a reply must not go to ``host`` (canonical IP text), or None. Cached: few clients repeat."""
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        return "client_unspecified"
    if ip.is_multicast:
        return "client_multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        return "client_broadcast"
    return None


class ReturnPath:
    """Validates backend replies and counts every outcome (one per inside datagram).

    ``reconfigure`` swaps the trusted sets whole when the tables change; the
    counters are monotonic and survive it.
    """

    def __init__(self, tables: Iterable[ServiceTable] = (), *, own_addresses: Iterable[Address] = ()) -> None:
        #: backend address -> VIP -> the sender entry allowed to use that VIP.
        self.senders: Mapping[Address, Mapping[Address, ReplySender]] = {}
        self.vips: frozenset[Address] = frozenset()
        self.own_addresses: frozenset[Address] = frozenset()
        self._extra_own: tuple[Address, ...] = ()
        #: Bumped by every :meth:`reconfigure`: adapters that cache validated headers drop them.
        self.generation = 0
        self.rx = 0
        self.tx = 0
        self.tx_bytes = 0
        self.rejected: dict[str, int] = {}
        self.stale_cid_replies: dict[tuple[str, str], int] = {}
        self.stale_config: dict[tuple[str, str], bool] = {}
        #: Called with (service, backend label, stale) when a backend's stale flag flips: the
        #: app logs it (the core does not log).
        self.on_stale_change: Callable[[str, str, bool], None] | None = None
        self.reconfigure(tables, own_addresses=own_addresses)

    def reconfigure(self, tables: Iterable[ServiceTable], *, own_addresses: Iterable[Address] | None = None) -> None:
        """Trust exactly the backends of ``tables``, each towards its own service's VIP."""
        senders: dict[Address, dict[Address, ReplySender]] = {}
        vips = set()
        for table in tables:
            vips.add(table.vip)
            for backend in table.backends.values():
                entry = ReplySender(table.name, backend.server_id, backend.label, table.decoder)
                senders.setdefault(normalize_address(backend.address), {})[table.vip] = entry
        if own_addresses is not None:
            self._extra_own = tuple(normalize_address(a) for a in own_addresses)
        self.senders = senders
        self.vips = frozenset(vips)
        self.own_addresses = self.vips | frozenset(self._extra_own)
        self.generation += 1

    # -- outcomes -------------------------------------------------------------

    def reject(self, reason: str) -> ReturnDecision:
        """Count one rejected datagram (also used by adapters for their cheap rejects)."""
        self.rx += 1
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return ReturnDecision(ReturnOutcome.REJECTED, reason=reason)

    def sender(self, source: Address) -> Mapping[Address, ReplySender] | None:
        """The VIPs ``source`` may reply from, or None when it is no configured backend."""
        try:
            return self.senders.get(normalize_address(source))
        except ValueError:
            return None

    def handle(self, datagram: bytes, source: Address) -> ReturnDecision:
        """Decide what to do with one datagram that arrived on the inside socket from ``source``."""
        allowed = self.sender(source)
        if allowed is None:
            return self.reject("source")
        try:
            header, offset = decode_proxy_header_untrusted(datagram)
        except MalformedDatagram as exc:
            return self.reject(exc.reason)
        decision = self.check_addresses(allowed, header.destination, header.source)
        if decision is not None:
            return decision
        vip, client = normalize_address(header.destination), normalize_address(header.source)
        payload = datagram[offset:]
        if payload[:1] >= b"\xc0":  # long header with the fixed bit: a handshake reply
            self.check_reply_scid(allowed[vip], payload)
        self.rx += 1
        self.tx += 1
        self.tx_bytes += len(payload)
        return ReturnDecision(ReturnOutcome.TO_CLIENT, vip=vip, client=client, payload=payload, offset=offset)

    def check_addresses(
        self, allowed: Mapping[Address, ReplySender], destination: Address, source: Address
    ) -> ReturnDecision | None:
        """Checks 3 and 4 on a decoded header: a counted rejection, or None when the reply may go."""
        try:
            vip = normalize_address(destination)
            client = normalize_address(source)
        except ValueError:
            return self.reject("address")
        if vip not in allowed:
            return self.reject("foreign_vip" if vip in self.vips else "unknown_vip")
        if client[1] == 0:
            return self.reject("client_port_zero")
        problem = client_address_problem(client[0])
        if problem is not None:
            return self.reject(problem)
        if client in self.own_addresses:
            return self.reject("client_own_address")
        return None

    def count_sent(self, datagrams: int, payload_bytes: int) -> None:
        """Adapters that validated replies through a cache of :meth:`check_addresses` results count here."""
        self.rx += datagrams
        self.tx += datagrams
        self.tx_bytes += payload_bytes

    def check_reply_scid(self, sender: ReplySender, payload: bytes) -> None:
        """R-20: flag a backend whose handshake SCID does not decode to it (see the module header)."""
        try:
            fields = parse_routing_fields_untrusted(payload)
        except MalformedDatagram:
            return
        if not fields.version or not fields.scid:  # VN (probe answers) or no SCID: nothing to check
            return
        key = (sender.service, sender.label)
        ok = sender.decoder.decode(fields.scid) == sender.server_id
        was_stale = self.stale_config.get(key, False)
        self.stale_config[key] = not ok
        if was_stale != (not ok) and self.on_stale_change is not None:
            self.on_stale_change(sender.service, sender.label, not ok)
        if not ok:
            self.stale_cid_replies[key] = self.stale_cid_replies.get(key, 0) + 1

    def stats(self) -> ReturnStats:
        return ReturnStats(
            self.rx, self.tx, self.tx_bytes, dict(self.rejected),
            dict(self.stale_cid_replies), dict(self.stale_config),
        )
