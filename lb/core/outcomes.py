"""What a routing decision can be, and the counters of a router: the vocabulary of lb.core.router.

Every client datagram ends in exactly one :class:`Outcome`; each outcome is
one exported counter (lb.control.metrics), so the
names here are a contract with the metrics and the acceptance tests.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from lb.core.cid_decoder import ConfigDecoder
from lb.core.service_table import Backend


class Outcome(enum.IntEnum):
    """The fate of one client datagram. Names match the exported counters."""

    CID_ROUTED = 0
    FALLBACK_INITIAL = 1  # long header, client-chosen (undecodable) DCID
    FALLBACK_UNKNOWN_SID = 2  # long header whose DCID decodes to an unassigned server ID
    FALLBACK_NO_CONFIG = 3  # short header, 0b111 / unknown config / too short, fallback switch on
    FALLBACK_SHORT_UNKNOWN_SID = 4  # short header, unassigned server ID, fallback switch on
    FALLBACK_UNKNOWN_VERSION = 5  # full-size datagram of a version the backends lack: one VN
    UNROUTABLE_DROPPED = 6  # short header, 0b111 / unknown config / too short
    UNKNOWN_SID_DROPPED = 7  # short header, server ID of no backend
    REMOVED_BACKEND_DROPPED = 8  # short header, server ID of a recently removed backend
    NO_BACKEND_DROPPED = 9  # needed the fallback, but no backend takes new flows
    MALFORMED_DROPPED = 10
    SMALL_UNKNOWN_VERSION_DROPPED = 11
    VN_DROPPED = 12
    RETRY_SENT = 13  # tokenless Initial answered with a Retry by the LB (retry offload)
    RETRY_RATE_LIMITED = 14  # would have been answered with a Retry, but its source is over the limit
    TOKEN_REJECTED = 15  # Initial whose Retry token is invalid, expired or from another address
    RESET_SENT = 16  # short header of a removed backend's CID, answered with a Stateless Reset

    @property
    def forwards(self) -> bool:
        return self <= Outcome.FALLBACK_UNKNOWN_VERSION

    @property
    def fallback_reason(self) -> str | None:
        return _FALLBACK_REASONS.get(self)


_FALLBACK_REASONS = {
    Outcome.FALLBACK_INITIAL: "initial",
    Outcome.FALLBACK_UNKNOWN_SID: "unknown_sid",
    Outcome.FALLBACK_NO_CONFIG: "no_config",
    Outcome.FALLBACK_SHORT_UNKNOWN_SID: "short_unknown_sid",
    Outcome.FALLBACK_UNKNOWN_VERSION: "unknown_version",
}

OUTCOMES = tuple(Outcome)


@dataclass(frozen=True)
class RouterStats:
    """A snapshot of one router's counters (monotonic; never reset by a table swap)."""

    service: str
    rx_client_datagrams: int
    outcomes: Mapping[Outcome, int]
    malformed: Mapping[str, int]
    cid_routed: Mapping[tuple[int, str], int]  # (config ID, backend label) -> count
    #: Datagrams sent to each backend (by label) through the fallback.
    fallback_routed: Mapping[str, int]
    cipher_calls: int
    cache_entries: int
    cache_evictions: int
    #: LB-built packets sent and rate-limited, by type ("retry", "reset"); their bytes.
    lb_originated: Mapping[str, int] = field(default_factory=dict)
    lb_originated_rate_limited: Mapping[str, int] = field(default_factory=dict)
    lb_originated_bytes: int = 0
    #: Retry tokens checked, by result (lb.core.retry_token.TokenResult).
    retry_tokens: Mapping[str, int] = field(default_factory=dict)

    def total_outcomes(self) -> int:
        return sum(self.outcomes.values())


RouteDecision = tuple[Outcome, Backend | None]


class ByteSlicer(Protocol):
    """Memory whose slices are ``bytes`` (``bytes`` itself, a ctypes char array)."""

    def __getitem__(self, index: slice, /) -> bytes: ...


class CidRoute:
    """A (configuration, backend) pair that DCIDs decode to: the decode cache's values.

    Holding the pre-built decision and the pair's counter here makes a cache hit
    one dict lookup and one increment: no tuple, no label lookup per datagram.
    """

    __slots__ = ("config_id", "count", "decision", "label")

    def __init__(self, config_id: int, backend: Backend) -> None:
        self.config_id = config_id
        self.label = backend.label
        self.count = 0
        self.decision: RouteDecision = (Outcome.CID_ROUTED, backend)


class LongHeader(NamedTuple):
    """What a long header that passed the cheap checks is routed by."""

    dcid: bytes
    #: The decoder its config bits name, or None when they name no live configuration or the
    #: DCID is too short for it (then the fallback, by ``reason``).
    decoder: ConfigDecoder | None
    #: The fallback outcome if the DCID does not lead to a backend.
    reason: Outcome
    supported: bool  # the version is one the backends speak

