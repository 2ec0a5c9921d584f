"""Backend health by Version Negotiation probes over the data path (sans-IO).

A probe is a long header with a greased version (``0x?a?a?a?a``, RFC 9000 §15)
padded to 1200 bytes: every QUIC server answers it with a Version Negotiation
packet that echoes the probe's DCID as its SCID, without creating connection
state (a real-version Initial would allocate a connection in aioquic for 60 s).
The probe travels exactly like client traffic — encapsulated to the backend's
data port, answered through the return path — so a healthy verdict means the
backend's event loop, its decapsulation and the return path all work.

Rules: one probe per backend per ``interval``; a probe unanswered after
``timeout`` is a miss; ``threshold`` consecutive misses mark the backend down,
one answer marks it up again. Backends start healthy, so a freshly started LB
routes at once (the draft's statelessness: a restart must not stall traffic).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lb.core.quic_header import parse_routing_fields_untrusted
from lb.errors import MalformedDatagram

#: A backend as the health checker knows it: (service name, server ID).
HealthKey = tuple[str, bytes]

GREASE_VERSION = 0x1A2A3A4A
PROBE_SIZE = 1200
NONCE_LEN = 16


def build_probe(nonce: bytes) -> bytes:
    """The 1200-byte probe whose VN reply carries ``nonce`` as SCID."""
    head = bytes((0xC0,)) + GREASE_VERSION.to_bytes(4, "big") + bytes((len(nonce),)) + nonce + b"\x00\x00"
    pad = PROBE_SIZE - len(head) - 2
    return head + (0x4000 | pad).to_bytes(2, "big") + bytes(pad)


def probe_reply_nonce_untrusted(datagram: bytes) -> bytes | None:
    """The echoed nonce if ``datagram`` is a Version Negotiation packet, else ``None``."""
    try:
        fields = parse_routing_fields_untrusted(datagram)
    except MalformedDatagram:
        return None
    if fields.version != 0 or not fields.scid:
        return None
    return fields.scid


@dataclass
class _Target:
    healthy: bool = True
    misses: int = 0
    pending: bytes | None = None
    sent_at: float = 0.0
    next_probe: float = 0.0
    probes: int = 0
    replies: int = 0
    rtts: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class HealthStatus:
    healthy: bool
    consecutive_misses: int
    probes: int
    replies: int
    last_rtt: float | None


K = TypeVar("K", bound=Hashable)


class HealthTracker(Generic[K]):
    """Tracks probe state per backend key; the adapter supplies ``now`` and the nonces."""

    def __init__(self, interval: float, timeout: float, threshold: int) -> None:
        self.interval = self.timeout = 0.0
        self.threshold = 0
        self.configure(interval, timeout, threshold)
        self._targets: dict[K, _Target] = {}
        self._by_nonce: dict[bytes, K] = {}

    def configure(self, interval: float, timeout: float, threshold: int) -> None:
        """Set the probe schedule (a reload may change it; per-backend state is kept)."""
        if interval <= 0 or timeout <= 0 or threshold < 1:
            raise ValueError("health: interval and timeout must be > 0 and threshold >= 1")
        self.interval = interval
        self.timeout = timeout
        self.threshold = threshold

    def set_targets(self, keys: Iterable[K]) -> None:
        """Keep state for known keys, add new ones (healthy), forget removed ones."""
        wanted = set(keys)
        for key in list(self._targets):
            if key not in wanted:
                target = self._targets.pop(key)
                if target.pending is not None:
                    self._by_nonce.pop(target.pending, None)
        for key in wanted:
            self._targets.setdefault(key, _Target())

    def is_healthy(self, key: K) -> bool:
        target = self._targets.get(key)
        return True if target is None else target.healthy

    def unhealthy(self) -> frozenset[K]:
        """The keys marked down: the health input of a table build (a value, safe to hand to another thread)."""
        return frozenset(key for key, t in self._targets.items() if not t.healthy)

    def status(self, key: K) -> HealthStatus | None:
        t = self._targets.get(key)
        if t is None:
            return None
        return HealthStatus(t.healthy, t.misses, t.probes, t.replies, t.rtts[-1] if t.rtts else None)

    def due(self, now: float, make_nonce: Callable[[], bytes]) -> list[tuple[K, bytes]]:
        """Probes to send now: ``(key, nonce)``. Call :meth:`expire` first."""
        out = []
        for key, t in self._targets.items():
            if t.pending is None and now >= t.next_probe:
                nonce = make_nonce()
                t.pending, t.sent_at, t.next_probe = nonce, now, now + self.interval
                t.probes += 1
                self._by_nonce[nonce] = key
                out.append((key, nonce))
        return out

    def on_reply(self, nonce: bytes, now: float) -> tuple[K, bool] | None:
        """Record an answer; returns ``(key, changed)`` or ``None`` for an unknown nonce."""
        key = self._by_nonce.pop(nonce, None)
        if key is None:
            return None
        t = self._targets[key]
        t.pending = None
        t.replies += 1
        t.rtts = [*t.rtts[-15:], now - t.sent_at]
        t.misses = 0
        changed = not t.healthy
        t.healthy = True
        return key, changed

    def expire(self, now: float) -> list[K]:
        """Turn overdue probes into misses; returns the keys whose health changed."""
        changed = []
        for key, t in self._targets.items():
            if t.pending is not None and now - t.sent_at >= self.timeout:
                self._by_nonce.pop(t.pending, None)
                t.pending = None
                t.misses += 1
                if t.healthy and t.misses >= self.threshold:
                    t.healthy = False
                    changed.append(key)
        return changed

    def next_wakeup(self, now: float) -> float:
        """When the adapter should call ``expire``/``due`` next."""
        times = [now + self.interval]
        for t in self._targets.values():
            times.append(t.sent_at + self.timeout if t.pending is not None else t.next_probe)
        return max(now, min(times))

