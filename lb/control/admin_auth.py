"""Who is asking, and how often they got the admin token wrong.

:func:`peer_key` names a client for the rate limit; :class:`AuthRateLimiter`
counts its authentication failures; :func:`bearer_token` reads the credential
out of an ``Authorization`` header value. The comparison itself
(:func:`hmac.compare_digest`) stays in the server, next to the route table.

The limiter never refuses a correct token (issue 12, item 13): a lockout only
changes how a *wrong* token is answered (429 instead of 401, one log line per
lockout instead of one per attempt). What stops guessing is the token's
entropy (the README asks for 32 random bytes, ``openssl rand -hex 32``);
what the limiter bounds is the cost of failures: log lines and memory.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass


def peer_key(peername: object) -> str:
    """The rate-limit identity of a peer: IPv4 address, IPv6 /64 prefix, or ``"local"``.

    An IPv6 host usually owns its whole /64, so keying single addresses would
    let one client rotate through them.
    """
    if not isinstance(peername, tuple) or not peername:
        return "local"
    host = str(peername[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def bearer_token(header: str | None) -> str | None:
    """The credentials of ``Authorization: Bearer <token>`` (scheme case-insensitive), else ``None``."""
    if header is None:
        return None
    scheme, _, credentials = header.partition(" ")
    credentials = credentials.strip(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials


@dataclass
class _PeerFailures:
    times: deque[float]
    locked_until: float = 0.0


class AuthRateLimiter:
    """Locks a peer's *failures* out after ``max_failures`` of them within ``window`` seconds.

    While locked, a wrong or missing token from that peer is answered 429 with
    ``Retry-After``; the right token still works. Memory is bounded: at most
    ``max_peers`` peers of at most ``max_failures`` timestamps each; the least
    recently failing peer is forgotten first. Time comes in as ``now``
    (monotonic seconds).
    """

    def __init__(
        self, *, max_failures: int = 10, window: float = 10.0, lockout: float = 60.0, max_peers: int = 1024
    ) -> None:
        if max_failures < 1 or window <= 0 or lockout <= 0 or max_peers < 1:
            raise ValueError("rate limit: max_failures and max_peers must be >= 1, window and lockout > 0")
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.max_peers = max_peers
        self._peers: OrderedDict[str, _PeerFailures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def retry_after(self, peer: str, now: float) -> float | None:
        """Seconds left in ``peer``'s lockout, or ``None`` when it is not locked out."""
        state = self._peers.get(peer)
        if state is None or state.locked_until <= now:
            return None
        return state.locked_until - now

    def record_failure(self, peer: str, now: float) -> bool:
        """Count one failure; ``True`` when it starts a lockout."""
        state = self._peers.get(peer)
        if state is None:
            if len(self._peers) >= self.max_peers:
                self._peers.popitem(last=False)
            state = _PeerFailures(deque(maxlen=self.max_failures))
            self._peers[peer] = state
        else:
            self._peers.move_to_end(peer)
        times = state.times
        while times and times[0] <= now - self.window:
            times.popleft()
        times.append(now)
        if len(times) >= self.max_failures:
            times.clear()
            state.locked_until = now + self.lockout
            return True
        return False
