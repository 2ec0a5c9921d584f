"""Packets the LB itself sends to clients: Retry (retry offload) and Stateless Reset.

The router decides *when* (design §3: a tokenless Initial that would take the
fallback while Retry is active; a short header whose server ID belongs to a
removed backend); this module decides *whether* (rate limits, the flood
meter, the token checks) and *what* (the bytes), and queues the packets for
the adapter, which sends them from the VIP socket after each batch.

Amplification (acceptance A-4): a Retry answers a datagram of at least 1200
bytes with about 100, a reset is always shorter than its trigger, and each
source IP gets at most :data:`lb.core.rate_limit.REPLIES_PER_SOURCE` LB-built
packets per second (:class:`~lb.core.rate_limit.SourceLimiter`, bounded state).

Sans-IO: the clock and the random source are injected; without a clock (the
default), a table with Retry or a reset key raises on its first such packet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lb.core.addresses import Address
from lb.core.cid_config import CidConfig
from lb.core.cid_encoder import MIN_UNROUTABLE_CID_LEN, unroutable_cid
from lb.core.rate_limit import SourceLimiter
from lb.core.retry_token import MAX_TOKENS_PER_KEY, TokenKey, TokenResult, make_retry_token, open_retry_token
from lb.core.stateless_packets import build_reset, build_retry, reset_length, reset_token

__all__ = ["FloodMeter", "LbReplies", "RetryPolicy"]

RETRY = "retry"
RESET = "reset"


@dataclass(frozen=True)
class RetryPolicy:
    """A service's retry offload, built by the control plane from ``retry*`` settings."""

    mode: str  # "always" | "flood"
    key: TokenKey = field(repr=False)
    #: "flood": tokenless Initials per second (this process) above which Retry starts.
    flood_threshold: int
    #: The configuration backends issue CIDs with: Retry SCIDs are as long as its CIDs.
    cid_config: CidConfig = field(repr=False)


class FloodMeter:
    """Counts tokenless Initials per second; active from the moment a second's count passes
    the threshold until the end of the following second (so one busy second is enough)."""

    def __init__(self) -> None:
        self._window = -1
        self._count = 0
        self._previous = 0

    def tokenless(self, now: float, threshold: int) -> bool:
        window = int(now)
        if window != self._window:
            self._previous = self._count if window == self._window + 1 else 0
            self._window = window
            self._count = 0
        self._count += 1
        return self._count > threshold or self._previous > threshold


class LbReplies:
    """Per-process state and counters of LB-built packets, and the queue the adapter drains."""

    def __init__(self, clock: Callable[[], float] | None, random_bytes: Callable[[int], bytes]) -> None:
        self.clock = clock if clock is not None else _no_clock
        self.random_bytes = random_bytes
        self.limiter = SourceLimiter()
        self.flood = FloodMeter()
        #: (packet, client) pairs to send from the VIP; the adapter empties it after each batch.
        self.queue: list[tuple[bytes, Address]] = []
        self.sent = {RETRY: 0, RESET: 0}
        self.rate_limited = {RETRY: 0, RESET: 0}
        self.bytes_sent = 0
        self.tokens: dict[str, int] = {}
        #: Tokens minted per token key (S-9: <= 2^23).
        self._minted: dict[bytes, int] = {}

    def take(self) -> list[tuple[bytes, Address]]:
        queue, self.queue = self.queue, []
        return queue

    # -- Retry -----------------------------------------------------------------------

    def token_valid(self, policy: RetryPolicy, token: bytes, client: Address, dcid: bytes) -> bool:
        result, _ = open_retry_token(policy.key, token, client, dcid, now=self.clock())
        self._count_token(result)
        return result is TokenResult.VALID

    def _count_token(self, result: TokenResult) -> None:
        self.tokens[result.value] = self.tokens.get(result.value, 0) + 1

    def retry_active(self, policy: RetryPolicy) -> bool:
        if policy.mode == "always":
            return True
        return self.flood.tokenless(self.clock(), policy.flood_threshold)

    def retry(self, policy: RetryPolicy, client: Address, *, version: int, odcid: bytes, client_scid: bytes) -> bool:
        """Queue a Retry for this Initial; False when rate-limited or the key is used up."""
        now = self.clock()
        if not self.limiter.allow(client[0], now):
            self.rate_limited[RETRY] += 1
            return False
        key_id = policy.key.key  # by value: a reload re-reads the same key
        minted = self._minted.get(key_id, 0)
        if minted >= MAX_TOKENS_PER_KEY:
            self.rate_limited[RETRY] += 1  # a new retry_key_file is needed
            return False
        self._minted[key_id] = minted + 1
        # Unroutable (0b111, random): the retried Initial takes the fallback, which puts it on
        # the backend that would have had it (same 4-tuple) and lets this LB check its token; an
        # Initial whose DCID routes to a backend is let through unchecked (see Router._retry_gate).
        rscid = unroutable_cid(max(policy.cid_config.cid_len, MIN_UNROUTABLE_CID_LEN))
        token = make_retry_token(policy.key, client, odcid, rscid, now=now, token_number=self.random_bytes(12))
        packet = build_retry(version, client_scid=client_scid, retry_scid=rscid, odcid=odcid, token=token,
                             unused_bits=self.random_bytes(1)[0])
        self._queue(RETRY, packet, client)
        return True

    def tokens_minted(self, policy: RetryPolicy) -> int:
        return self._minted.get(policy.key.key, 0)

    # -- Stateless reset -------------------------------------------------------------

    def reset(self, key: bytes, server_id: bytes, cid: bytes, client: Address, trigger_len: int) -> bool:
        """Queue a reset of ``cid`` (a CID of removed backend ``server_id``); False if not sent."""
        length = reset_length(trigger_len)
        if length is None:
            return False
        if not self.limiter.allow(client[0], self.clock()):
            self.rate_limited[RESET] += 1
            return False
        token = reset_token(key, server_id, cid)
        self._queue(RESET, build_reset(token, length, self.random_bytes(length - len(token))), client)
        return True

    def _queue(self, kind: str, packet: bytes, client: Address) -> None:
        self.queue.append((packet, client))
        self.sent[kind] += 1
        self.bytes_sent += len(packet)


def _no_clock() -> float:
    raise RuntimeError("Router(clock=...) is required for Retry and stateless resets (tokens carry POSIX times)")
