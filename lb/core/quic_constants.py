"""QUIC numbers the load balancer, the backends and the test kit share: one definition each.

Versions, header bits and size limits from RFC 8999 (invariants), RFC 9000
(QUIC v1) and RFC 9369 (QUIC v2). Plain ints, so the hot paths may copy them
into locals; nothing here parses bytes (that is :mod:`lb.core.quic_header`).
"""

from __future__ import annotations

__all__ = [
    "FIXED_BIT",
    "GREASE_VERSION",
    "HEADER_FORM_LONG",
    "INITIAL_TYPE_BITS",
    "KNOWN_VERSIONS",
    "MAX_CID_LEN_INVARIANT",
    "MAX_CID_LEN_V1",
    "MIN_INITIAL_DATAGRAM",
    "QUIC_V1",
    "QUIC_V2",
    "VERSION_NEGOTIATION",
    "is_reserved_version",
]

#: QUIC version 1 (RFC 9000 §15).
QUIC_V1 = 0x00000001
#: QUIC version 2 (RFC 9369 §3.1).
QUIC_V2 = 0x6B3343CF
#: The version field of a Version Negotiation packet (RFC 8999 §6).
VERSION_NEGOTIATION = 0x00000000
#: Versions whose header rules we enforce (fixed bit, 20-byte CIDs), and the default
#: set the backends speak.
KNOWN_VERSIONS: frozenset[int] = frozenset({QUIC_V1, QUIC_V2})
#: A reserved version of the form 0x?a?a?a?a (RFC 9000 §15): every server answers it
#: with Version Negotiation, which is what health probes and tests rely on.
GREASE_VERSION = 0x1A2A3A4A

#: First-octet bit that selects the long header form (RFC 8999 §5.1).
HEADER_FORM_LONG = 0x80
#: First-octet bit that is 1 in v1/v2 packets unless RFC 9287 greasing was negotiated
#: (RFC 9000 §17.2, §17.3.1).
FIXED_BIT = 0x40
#: Wire value of the long packet type bits that means Initial: 0b00 in v1
#: (RFC 9000 §17.2.2), 0b01 in v2 (RFC 9369 §3.2 permutes the types).
INITIAL_TYPE_BITS: dict[int, int] = {QUIC_V1: 0b00, QUIC_V2: 0b01}

#: Longest connection ID QUIC v1 (and v2) allows, in bytes (RFC 9000 §17.2).
MAX_CID_LEN_V1 = 20
#: Longest CID the invariants can express: a one-byte length (RFC 8999 §5.1).
MAX_CID_LEN_INVARIANT = 255
#: Smallest UDP payload that may carry a client Initial, in bytes (RFC 9000 §14.1);
#: also the size below which an unknown version must not draw a VN (RFC 9000 §5.2.2).
MIN_INITIAL_DATAGRAM = 1200


def is_reserved_version(version: int) -> bool:
    """Whether ``version`` is a greasing version ``0x?a?a?a?a`` (RFC 9000 §15)."""
    return version & 0x0F0F0F0F == 0x0A0A0A0A
