"""Per-source limits on packets built without a connection (Retry, stateless reset; acceptance A-4).

Shared by the LB (:mod:`lb.core.lb_replies`) and the backends'
resets (:mod:`backends.stateless`): at most :data:`REPLIES_PER_SOURCE` per source
IP per one-second window, so neither can be turned into a reflector aimed at
one address. State is bounded: at most :data:`MAX_TRACKED_SOURCES` addresses
per window; past that nothing more is sent in that window (fail closed: these
packets are an optimisation, never needed for correctness).

Sans-IO: the time arrives as ``now``.
"""

from __future__ import annotations

__all__ = ["MAX_TRACKED_SOURCES", "REPLIES_PER_SOURCE", "SourceLimiter"]

#: Packets per second to one source IP (acceptance A-4: at most 10).
REPLIES_PER_SOURCE = 10
MAX_TRACKED_SOURCES = 65536


class SourceLimiter:
    """At most ``rate`` packets per source IP per one-second window; a bounded table."""

    def __init__(self, rate: int = REPLIES_PER_SOURCE, max_sources: int = MAX_TRACKED_SOURCES) -> None:
        self.rate = rate
        self.max_sources = max_sources
        self._window = -1
        self._counts: dict[str, int] = {}

    def allow(self, ip: str, now: float) -> bool:
        window = int(now)
        if window != self._window:
            self._window = window
            self._counts = {}
        counts = self._counts
        count = counts.get(ip, 0)
        if count >= self.rate or (count == 0 and len(counts) >= self.max_sources):
            return False
        counts[ip] = count + 1
        return True
