"""The stateless return path: backend replies in, (VIP, client, payload) out (design.md §4).

A backend sends each reply to the LB's inside address behind a PROXY v2
header whose *source* is the client (where the reply goes) and whose
*destination* is the VIP (which socket it leaves from). The LB needs no
lookup and no per-flow state, so any LB instance can return any reply.

Trust (acceptance A-7, S-8): the LB sends these payloads *from the VIP*, so
an open inside port would make it a reflector. Only datagrams from configured
backend addresses are accepted, only towards VIPs this LB serves; everything
else is dropped and counted by reason. The header is always the outermost
bytes of the datagram; nothing is ever parsed out of the payload.

Health probes need no special case: the LB's health checker is just another
client (its own socket), so a probe's answer comes back through this path like
any reply — through whichever LB instance the kernel picks — and that is what
makes the probe test the whole round trip.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lb.core.encapsulation import decapsulate_untrusted
from lb.core.service_table import Address, normalize_address
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


@dataclass(frozen=True, slots=True)
class ReturnDecision:
    outcome: ReturnOutcome
    vip: Address | None = None
    client: Address | None = None
    payload: bytes = b""
    reason: str = ""


class ReturnPath:
    """Validates backend replies and counts every outcome (one per inside datagram).

    ``reconfigure`` swaps the trusted sets whole when the configuration changes;
    the counters are monotonic and survive it.
    """

    def __init__(self, backend_addresses: Iterable[Address], vips: Iterable[Address]) -> None:
        self.allowed: frozenset[Address] = frozenset()
        self.vips: frozenset[Address] = frozenset()
        self.reconfigure(backend_addresses, vips)
        self.rx = 0
        self.tx = 0
        self.tx_bytes = 0
        self.rejected: dict[str, int] = {}

    def reconfigure(self, backend_addresses: Iterable[Address], vips: Iterable[Address]) -> None:
        self.allowed = frozenset(normalize_address(a) for a in backend_addresses)
        self.vips = frozenset(normalize_address(v) for v in vips)

    def _reject(self, reason: str) -> ReturnDecision:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return ReturnDecision(ReturnOutcome.REJECTED, reason=reason)

    def handle(self, datagram: bytes, source: Address) -> ReturnDecision:
        """Decide what to do with one datagram that arrived on the inside socket from ``source``."""
        self.rx += 1
        try:
            src = normalize_address(source)
        except ValueError:
            return self._reject("source")
        if src not in self.allowed:
            return self._reject("source")
        try:
            header, payload = decapsulate_untrusted(datagram)
        except MalformedDatagram as exc:
            return self._reject(exc.reason)
        try:
            vip = normalize_address(header.destination)
            client = normalize_address(header.source)
        except ValueError:
            return self._reject("address")
        if vip not in self.vips:
            return self._reject("unknown_vip")
        if client[1] == 0:
            return self._reject("client_port_zero")
        self.tx += 1
        self.tx_bytes += len(payload)
        return ReturnDecision(ReturnOutcome.TO_CLIENT, vip=vip, client=client, payload=payload)

    def stats(self) -> ReturnStats:
        return ReturnStats(self.rx, self.tx, self.tx_bytes, dict(self.rejected))
