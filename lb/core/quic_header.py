"""The routing view of a QUIC datagram: version-independent invariants (RFC 8999).

Rules:

1. Parse only what routing needs: the first octet, the version, and the
   connection IDs. Nothing past the long header's Source Connection ID is read
   (no token, no Length, no packet number: those are version-specific and
   protected).
2. Only the *first* packet of a datagram matters. Coalesced packets (RFC 9000
   §12.2) must share the DCID, so the rest of the datagram is opaque.
3. :func:`parse_routing_fields_untrusted` returns :class:`RoutingFields` or
   raises :class:`~lb.errors.MalformedDatagram`, nothing else. Its ``reason``
   is one of ``"empty"``, ``"truncated"``, ``"cid_too_long"``, ``"fixed_bit"``.
   :func:`dcid_of_untrusted` is the cheaper cut for callers that need only the
   DCID (the backends); the numbers both use live in :mod:`lb.core.quic_constants`.
4. Policy (Version Negotiation drops, the 1200-byte minimum for unknown
   versions, which DCID length to decode) belongs to the router, not here.

This runs once per datagram on the hot path: one ``struct`` unpack, two or
three slices, no other allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

from lb.core.quic_constants import (
    FIXED_BIT,
    HEADER_FORM_LONG,
    INITIAL_TYPE_BITS,
    KNOWN_VERSIONS,
    MAX_CID_LEN_V1,
    VERSION_NEGOTIATION,
)
from lb.errors import MalformedDatagram

__all__ = [
    "RoutingFields",
    "dcid_of_untrusted",
    "parse_routing_fields_untrusted",
]

# Long header prefix (RFC 8999 §5.1), laid out field by field:
#   B  first octet (header form 1, then 7 version-specific bits)
#   I  version, 32 bits, network order
#   B  Destination Connection ID length, 0..255
_LONG_PREFIX = struct.Struct(">BIB")
_LONG_PREFIX_LEN = _LONG_PREFIX.size  # 6
_DCID_START = _LONG_PREFIX_LEN
_DCID_LEN_AT = _LONG_PREFIX_LEN - 1


def dcid_of_untrusted(datagram: bytes | memoryview, short_dcid_len: int) -> bytes:
    """The Destination Connection ID of the first packet in ``datagram``, and nothing else.

    The cheap path for code that only needs the DCID (a backend's per-datagram
    checks): no version rules, no SCID, no allocation beyond the slice. A long
    header carries its DCID length (RFC 8999 §5.1); a short header does not
    (§5.2), so the caller says how long its own CIDs are (``short_dcid_len``).
    The fixed bit is not checked: that is version policy.

    Raises :class:`MalformedDatagram` (``"empty"`` or ``"truncated"``) and nothing else.
    """
    size = len(datagram)
    if size == 0:
        raise MalformedDatagram("empty")
    if datagram[0] & HEADER_FORM_LONG:
        if size < _LONG_PREFIX_LEN:
            raise MalformedDatagram("truncated", f"long header of {size} bytes")
        end = _DCID_START + datagram[_DCID_LEN_AT]
        if size < end:
            raise MalformedDatagram("truncated", f"DCID of {end - _DCID_START} bytes in {size}")
        return bytes(datagram[_DCID_START:end])
    if size < 1 + short_dcid_len:
        raise MalformedDatagram("truncated", f"short header of {size} bytes, DCID of {short_dcid_len}")
    return bytes(datagram[1 : 1 + short_dcid_len])


@dataclass(frozen=True, slots=True)
class RoutingFields:
    """What the router needs from the first packet of a datagram."""

    #: True for a long header (RFC 8999 §5.1), False for a short header (§5.2).
    is_long: bool
    #: The raw first octet, including the version-specific bits.
    first_byte: int
    #: The 32-bit version of a long header; ``None`` for a short header.
    version: int | None
    #: Long header: exactly the Destination Connection ID. Short header: the
    #: bytes after the first octet, at most ``MAX_CID_LEN_V1`` of them, because
    #: a short header does not carry its DCID length (RFC 8999 §5.2); the
    #: router applies the configured length and ignores the rest.
    dcid: bytes
    #: The Source Connection ID of a long header; ``None`` for a short header.
    scid: bytes | None
    #: The wire value of the long packet type bits, ``(first_byte >> 4) & 3``,
    #: for QUIC v1 and v2 only (their meaning differs, RFC 9369 §3.2); ``None``
    #: for short headers and other versions, whose first octet is opaque.
    long_packet_type: int | None

    @property
    def is_initial(self) -> bool:
        """True for a v1 or v2 Initial packet, reading the type bits per version."""
        if self.long_packet_type is None:
            return False
        return INITIAL_TYPE_BITS.get(self.version or 0) == self.long_packet_type

    @property
    def is_version_negotiation(self) -> bool:
        """True for a Version Negotiation packet (long header, version 0, RFC 8999 §6)."""
        return self.is_long and self.version == VERSION_NEGOTIATION

    def __repr__(self) -> str:
        # Hex, not Python bytes literals: CIDs are opaque binary.
        version = "None" if self.version is None else f"0x{self.version:08x}"
        scid = "None" if self.scid is None else self.scid.hex()
        return (
            f"RoutingFields(is_long={self.is_long}, first_byte=0x{self.first_byte:02x}, "
            f"version={version}, dcid={self.dcid.hex()}, scid={scid}, "
            f"long_packet_type={self.long_packet_type})"
        )


# Hot-path constructor. A frozen dataclass's __init__ goes through
# object.__setattr__ once per field, which costs about twice as much as the
# rest of the parse; writing the slots through their member descriptors builds
# the identical immutable object without that detour. The assert keeps the
# setter list in step with the class if a field is ever added.
_FIELD_NAMES = ("is_long", "first_byte", "version", "dcid", "scid", "long_packet_type")
assert tuple(f.name for f in fields(RoutingFields)) == _FIELD_NAMES
_new_fields = object.__new__
_set_is_long, _set_first_byte, _set_version, _set_dcid, _set_scid, _set_long_packet_type = (
    getattr(RoutingFields, name).__set__ for name in _FIELD_NAMES
)


def _make_fields(values: tuple[bool, int, int | None, bytes, bytes | None, int | None]) -> RoutingFields:
    obj: RoutingFields = _new_fields(RoutingFields)
    is_long, first_byte, version, dcid, scid, long_packet_type = values
    _set_is_long(obj, is_long)
    _set_first_byte(obj, first_byte)
    _set_version(obj, version)
    _set_dcid(obj, dcid)
    _set_scid(obj, scid)
    _set_long_packet_type(obj, long_packet_type)
    return obj


def parse_routing_fields_untrusted(
    datagram: bytes | memoryview,
    known_versions: frozenset[int] = KNOWN_VERSIONS,
) -> RoutingFields:
    """Parse the first octet, version and connection IDs of ``datagram``.

    ``known_versions`` are the versions whose own header rules apply on top of
    the invariants: a set fixed bit and CIDs of at most 20 bytes (RFC 9000
    §17.2). Any other version, including 0 (Version Negotiation) and greased
    versions, is parsed by the invariants alone: CIDs up to 255 bytes, any
    first-octet bits (RFC 8999 §5.1, §6).

    Raises :class:`MalformedDatagram` and nothing else.
    """
    size = len(datagram)
    if size == 0:
        raise MalformedDatagram("empty")
    first = datagram[0]

    if not first & HEADER_FORM_LONG:
        # Short header (RFC 8999 §5.2, RFC 9000 §17.3.1). Every version we
        # serve uses the fixed bit and our backends (aioquic) never negotiate
        # grease_quic_bit (RFC 9287), so a clear bit is not QUIC we can route.
        if not first & FIXED_BIT:
            raise MalformedDatagram("fixed_bit", f"short header first byte 0x{first:02x}")
        if size < 2:
            raise MalformedDatagram("truncated", "short header without a DCID")
        dcid = datagram[1 : 1 + MAX_CID_LEN_V1]
        return _make_fields((False, first, None, dcid if type(dcid) is bytes else bytes(dcid), None, None))

    if size < _LONG_PREFIX_LEN:
        raise MalformedDatagram("truncated", f"long header of {size} bytes")
    try:
        _, version, dcid_len = _LONG_PREFIX.unpack_from(datagram)
    except struct.error as exc:  # unreachable after the size check; kept as the boundary
        raise MalformedDatagram("truncated", str(exc)) from None

    known = version in known_versions
    if known:
        # RFC 9000 §17.2: the fixed bit is 1 in v1 (and v2, RFC 9369 §3) long
        # headers. RFC 8999 does not define it, so unknown versions skip this.
        if not first & FIXED_BIT:
            raise MalformedDatagram("fixed_bit", f"version 0x{version:08x}")
        if dcid_len > MAX_CID_LEN_V1:
            raise MalformedDatagram("cid_too_long", f"DCID of {dcid_len} bytes")

    scid_len_at = _DCID_START + dcid_len
    if size <= scid_len_at:
        raise MalformedDatagram("truncated", f"DCID of {dcid_len} bytes in {size}")
    scid_len = datagram[scid_len_at]
    if known and scid_len > MAX_CID_LEN_V1:
        raise MalformedDatagram("cid_too_long", f"SCID of {scid_len} bytes")
    scid_end = scid_len_at + 1 + scid_len
    if size < scid_end:
        raise MalformedDatagram("truncated", f"SCID of {scid_len} bytes in {size}")

    packet_type = (first >> 4) & 0b11 if version in INITIAL_TYPE_BITS else None
    return _make_fields(
        (
            True,
            first,
            version,
            bytes(datagram[_DCID_START:scid_len_at]),
            bytes(datagram[scid_len_at + 1 : scid_end]),
            packet_type,
        )
    )
