"""RFC 8999 routing-field parser: edge-case table (F-4), h11-style checks, properties (F-1, F-2)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.core.quic_constants import GREASE_VERSION, MAX_CID_LEN_V1, QUIC_V1, QUIC_V2, is_reserved_version
from lb.core.quic_header import RoutingFields, dcid_of_untrusted, parse_routing_fields_untrusted
from lb.errors import MalformedDatagram
from quiclb_harness.datagrams import (
    initial,
    long_header,
    short_header,
    version_negotiation,
    vn_probe,
)

DCID8 = bytes(range(1, 9))
SCID8 = bytes(range(0x11, 0x19))
CID20 = bytes(range(0x20, 0x34))

# --- F-4 edge-case table -----------------------------------------------------

# (description, datagram, expected reason or None, expected (version, dcid, scid) when accepted)
Expected = tuple[int | None, bytes, bytes | None] | None
CASES: list[tuple[str, bytes, str | None, Expected]] = [
    ("0 bytes", b"", "empty", None),
    ("1 byte short header", b"\x40", "truncated", None),
    ("1 byte long header", b"\xc0", "truncated", None),
    ("1 byte, fixed bit clear", b"\x00", "fixed_bit", None),
    ("long header cut in version", b"\xc0\x00\x00", "truncated", None),
    ("long header without SCID length", initial(QUIC_V1, DCID8, SCID8)[:14], "truncated", None),
    ("long header cut in DCID", initial(QUIC_V1, DCID8, SCID8)[:10], "truncated", None),
    ("long header cut in SCID", initial(QUIC_V1, DCID8, SCID8)[:20], "truncated", None),
    ("v1 Initial", initial(QUIC_V1, DCID8, SCID8), None, (QUIC_V1, DCID8, SCID8)),
    ("v2 Initial", initial(QUIC_V2, DCID8, SCID8), None, (QUIC_V2, DCID8, SCID8)),
    ("v1 empty CIDs", initial(QUIC_V1, b"", b""), None, (QUIC_V1, b"", b"")),
    ("v1 20-byte CIDs", initial(QUIC_V1, CID20, CID20), None, (QUIC_V1, CID20, CID20)),
    ("v1 DCID of 21", long_header(QUIC_V1, bytes(21), SCID8), "cid_too_long", None),
    ("v1 SCID of 21", long_header(QUIC_V1, DCID8, bytes(21)), "cid_too_long", None),
    ("v2 DCID of 255", long_header(QUIC_V2, bytes(255), SCID8), "cid_too_long", None),
    ("v1 fixed bit clear", long_header(QUIC_V1, DCID8, SCID8, first_byte=0x80), "fixed_bit", None),
    ("v2 fixed bit clear", long_header(QUIC_V2, DCID8, SCID8, first_byte=0x90), "fixed_bit", None),
    (
        "unknown version, DCID of 21",
        long_header(0xFF00ABCD, bytes(21), SCID8),
        None,
        (0xFF00ABCD, bytes(21), SCID8),
    ),
    (
        "unknown version, DCID and SCID of 255",
        long_header(0xFF00ABCD, b"\xaa" * 255, b"\xbb" * 255),
        None,
        (0xFF00ABCD, b"\xaa" * 255, b"\xbb" * 255),
    ),
    (
        "unknown version, fixed bit clear (RFC 8999 does not define it)",
        long_header(0xFF00ABCD, DCID8, SCID8, first_byte=0x80),
        None,
        (0xFF00ABCD, DCID8, SCID8),
    ),
    (
        "greased version 0x1a2a3a4a, DCID of 21",
        long_header(GREASE_VERSION, bytes(21), b""),
        None,
        (GREASE_VERSION, bytes(21), b""),
    ),
    (
        "greased version 0xfafafafa",
        long_header(0xFAFAFAFA, DCID8, SCID8, pad_to=1200),
        None,
        (0xFAFAFAFA, DCID8, SCID8),
    ),
    ("VN probe", vn_probe(DCID8, low_bits=5), None, (GREASE_VERSION, DCID8, b"")),
    (
        "inbound VN (version 0)",
        version_negotiation(DCID8, SCID8, [QUIC_V1, QUIC_V2]),
        None,
        (0, DCID8, SCID8),
    ),
    (
        "inbound VN with first byte 0x80 and 255-byte CIDs",
        version_negotiation(b"\x01" * 255, b"\x02" * 255, [QUIC_V1], first_byte=0x80),
        None,
        (0, b"\x01" * 255, b"\x02" * 255),
    ),
    (
        "coalesced Initial + Handshake: only the first DCID matters",
        initial(QUIC_V1, DCID8, SCID8, pad_to=600) + long_header(QUIC_V1, CID20, SCID8, packet_type=2),
        None,
        (QUIC_V1, DCID8, SCID8),
    ),
    (
        "coalesced Initial + garbage",
        initial(QUIC_V1, DCID8, SCID8, pad_to=100) + b"\xff" * 50,
        None,
        (QUIC_V1, DCID8, SCID8),
    ),
    ("short header", short_header(CID20), None, (None, CID20, None)),
    ("short header below the CID length", b"\x41\x01\x02\x03", None, (None, b"\x01\x02\x03", None)),
    ("short header, fixed bit clear", short_header(DCID8, first_byte=0x01), "fixed_bit", None),
]


@pytest.mark.parametrize(
    ("datagram", "reason", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_edge_cases(datagram: bytes, reason: str | None, expected: Expected) -> None:
    if reason is not None:
        with pytest.raises(MalformedDatagram) as info:
            parse_routing_fields_untrusted(datagram)
        assert info.value.reason == reason
        return
    assert expected is not None
    fields = parse_routing_fields_untrusted(datagram)
    assert (fields.version, fields.dcid, fields.scid) == expected
    assert fields.is_long == (expected[0] is not None)
    assert fields.first_byte == datagram[0]
    # The same answer from a memoryview (adapters may pass one).
    assert parse_routing_fields_untrusted(memoryview(datagram)) == fields


def test_short_header_dcid_is_capped_at_20_bytes() -> None:
    fields = parse_routing_fields_untrusted(short_header(CID20 + b"\xee" * 10, payload_len=100))
    assert fields.dcid == CID20
    assert len(fields.dcid) == MAX_CID_LEN_V1
    assert fields.long_packet_type is None
    assert not fields.is_initial


@pytest.mark.parametrize(
    ("datagram", "packet_type", "is_initial"),
    [
        (initial(QUIC_V1, DCID8, SCID8), 0, True),
        (initial(QUIC_V2, DCID8, SCID8), 1, True),
        (long_header(QUIC_V1, DCID8, SCID8, packet_type=1), 1, False),  # v1 0-RTT
        (long_header(QUIC_V2, DCID8, SCID8, packet_type=0), 0, False),  # v2 Retry
        (long_header(QUIC_V1, DCID8, SCID8, packet_type=2), 2, False),  # v1 Handshake
        (vn_probe(DCID8), None, False),  # unknown version: type bits are opaque
        (version_negotiation(DCID8, SCID8, [QUIC_V1]), None, False),
    ],
    ids=["v1-initial", "v2-initial", "v1-0rtt", "v2-retry", "v1-handshake", "grease", "vn"],
)
def test_packet_type_per_version(datagram: bytes, packet_type: int | None, is_initial: bool) -> None:
    fields = parse_routing_fields_untrusted(datagram)
    assert fields.long_packet_type == packet_type
    assert fields.is_initial is is_initial


def test_version_negotiation_flag() -> None:
    assert parse_routing_fields_untrusted(version_negotiation(DCID8, SCID8, [1])).is_version_negotiation
    assert not parse_routing_fields_untrusted(initial(QUIC_V1, DCID8, SCID8)).is_version_negotiation
    assert not parse_routing_fields_untrusted(short_header(DCID8)).is_version_negotiation


def test_known_versions_parameter() -> None:
    # With v1 unknown, a 21-byte DCID and a clear fixed bit follow RFC 8999 only.
    datagram = long_header(QUIC_V1, bytes(21), SCID8, first_byte=0x80)
    fields = parse_routing_fields_untrusted(datagram, known_versions=frozenset())
    assert fields.dcid == bytes(21)
    # A private version made known gets the v1 limits.
    with pytest.raises(MalformedDatagram) as info:
        parse_routing_fields_untrusted(long_header(0xFF00ABCD, bytes(21), b""), frozenset({0xFF00ABCD}))
    assert info.value.reason == "cid_too_long"


@pytest.mark.parametrize(
    ("version", "reserved"),
    [
        (0x1A2A3A4A, True),
        (0xFAFAFAFA, True),
        (0x0A0A0A0A, True),
        (QUIC_V1, False),
        (QUIC_V2, False),
        (0, False),
    ],
)
def test_is_reserved_version(version: int, reserved: bool) -> None:
    assert is_reserved_version(version) is reserved


def test_repr_is_hex() -> None:
    text = repr(parse_routing_fields_untrusted(initial(QUIC_V1, DCID8, SCID8)))
    assert DCID8.hex() in text
    assert "version=0x00000001" in text


# --- h11-style: whole input, every truncation, trailing bytes ------------------


def _header_len(datagram: bytes) -> int:
    """Bytes of the invariant header (through the SCID) of a long-header datagram."""
    dcid_len = datagram[5]
    return 6 + dcid_len + 1 + datagram[6 + dcid_len]


LONG_HEADERS = [
    initial(QUIC_V1, DCID8, SCID8),
    initial(QUIC_V2, CID20, b""),
    long_header(0xFF00ABCD, bytes(200), bytes(40)),
    version_negotiation(DCID8, SCID8, [QUIC_V1]),
    vn_probe(CID20),
]


@pytest.mark.parametrize("datagram", LONG_HEADERS, ids=["v1", "v2", "unknown", "vn", "probe"])
def test_every_truncation_raises(datagram: bytes) -> None:
    whole = parse_routing_fields_untrusted(datagram)
    header_len = _header_len(datagram)
    for cut in range(header_len):
        with pytest.raises(MalformedDatagram) as info:
            parse_routing_fields_untrusted(datagram[:cut])
        assert info.value.reason in {"empty", "truncated"}
    # The header alone is enough, and anything after it is ignored.
    assert parse_routing_fields_untrusted(datagram[:header_len]) == whole
    assert parse_routing_fields_untrusted(datagram[:header_len] + b"\xff" * 37) == whole


def test_short_header_truncations() -> None:
    datagram = short_header(CID20, payload_len=10)
    for cut in (0, 1):
        with pytest.raises(MalformedDatagram):
            parse_routing_fields_untrusted(datagram[:cut])
    # A short header carries no DCID length: any shorter datagram parses, and
    # the router decides whether enough DCID bytes are present.
    for cut in range(2, len(datagram) + 1):
        assert parse_routing_fields_untrusted(datagram[:cut]).dcid == datagram[1 : min(cut, 21)]


# --- hypothesis: F-1 arbitrary bytes, F-2 generated headers ----------------------


def _biased_first_byte() -> st.SearchStrategy[int]:
    # acceptance F-1: bias toward bytes that pass the form and fixed-bit checks.
    return st.one_of(st.integers(0x40, 0x7F), st.integers(0xC0, 0xFF), st.integers(0, 0xFF))


@settings(max_examples=1000)
@given(st.binary(max_size=1500))
def test_arbitrary_bytes_only_malformed(data: bytes) -> None:
    try:
        fields = parse_routing_fields_untrusted(data)
    except MalformedDatagram:
        return
    assert isinstance(fields, RoutingFields)


@settings(max_examples=1000)
@given(_biased_first_byte(), st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=600))
def test_biased_bytes_only_malformed(first: int, version: int, dcid_len: int, rest: bytes) -> None:
    data = bytes([first]) + version.to_bytes(4, "big") + bytes([dcid_len]) + rest
    try:
        fields = parse_routing_fields_untrusted(data)
    except MalformedDatagram:
        return
    if fields.is_long:
        assert fields.scid is not None
        assert data[6 : 6 + dcid_len] == fields.dcid
        # Header + rest = length (F-2): the CIDs were read from bytes that exist.
        assert 6 + len(fields.dcid) + 1 + len(fields.scid) <= len(data)
    else:
        assert fields.dcid == data[1:21]


versions = st.one_of(
    st.sampled_from([QUIC_V1, QUIC_V2, 0, GREASE_VERSION]),
    st.integers(0, 2**32 - 1),
)


@settings(max_examples=500)
@given(
    versions,
    st.binary(max_size=255),
    st.binary(max_size=255),
    st.integers(0, 3),
    st.integers(0, 0x0F),
    st.binary(max_size=100),
)
def test_generated_long_headers_round_trip(
    version: int, dcid: bytes, scid: bytes, packet_type: int, low_bits: int, trailer: bytes
) -> None:
    first = 0xC0 | (packet_type << 4) | low_bits
    datagram = long_header(version, dcid, scid, packet_type=packet_type, first_byte=first) + trailer
    known = version in (QUIC_V1, QUIC_V2)
    if known and (len(dcid) > MAX_CID_LEN_V1 or len(scid) > MAX_CID_LEN_V1):
        with pytest.raises(MalformedDatagram) as info:
            parse_routing_fields_untrusted(datagram)
        assert info.value.reason == "cid_too_long"
        return
    fields = parse_routing_fields_untrusted(datagram)
    assert fields.is_long
    assert (fields.version, fields.dcid, fields.scid, fields.first_byte) == (version, dcid, scid, first)
    assert fields.long_packet_type == (packet_type if known else None)


@given(st.binary(min_size=0, max_size=40), st.integers(0, 0x3F), st.binary(max_size=50))
def test_generated_short_headers_round_trip(dcid: bytes, low_bits: int, rest: bytes) -> None:
    datagram = bytes([0x40 | low_bits]) + dcid + rest
    if len(datagram) < 2:
        with pytest.raises(MalformedDatagram):
            parse_routing_fields_untrusted(datagram)
        return
    fields = parse_routing_fields_untrusted(datagram)
    assert not fields.is_long
    assert fields.dcid == datagram[1 : 1 + MAX_CID_LEN_V1]
    assert fields.version is None
    assert fields.scid is None


@settings(max_examples=500)
@given(
    st.sampled_from([*LONG_HEADERS, short_header(CID20)]),
    st.lists(st.tuples(st.integers(0, 1299), st.integers(0, 255)), max_size=8),
    st.integers(0, 1300),
)
def test_mutated_headers_only_malformed(datagram: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    # F-2: valid headers, then mutated; the parser returns fields or MalformedDatagram.
    mutated = bytearray(datagram)
    for index, value in flips:
        if index < len(mutated):
            mutated[index] = value
    data = bytes(mutated[:cut])
    try:
        fields = parse_routing_fields_untrusted(data)
    except MalformedDatagram:
        return
    if fields.is_long and fields.scid is not None:
        assert data[6 : 6 + len(fields.dcid)] == fields.dcid


def test_fast_constructed_fields_behave_like_the_dataclass() -> None:
    # The parser builds RoutingFields without __init__ (hot path); it must be
    # indistinguishable from one built normally: equal, hashable, frozen.
    fields = parse_routing_fields_untrusted(initial(QUIC_V1, DCID8, SCID8))
    assert fields == RoutingFields(True, fields.first_byte, QUIC_V1, DCID8, SCID8, 0)
    assert hash(fields) == hash(RoutingFields(True, fields.first_byte, QUIC_V1, DCID8, SCID8, 0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fields.dcid = b""  # type: ignore[misc]


# -- dcid_of_untrusted: the backends' cheap DCID cut --------------------------------


@pytest.mark.parametrize(
    ("datagram", "short_len", "expected"),
    [
        (short_header(CID20[:8], payload_len=4), 8, CID20[:8]),
        (short_header(CID20[:8]), 4, CID20[:4]),  # the caller's length, whatever follows
        (initial(QUIC_V1, DCID8, SCID8), 17, DCID8),  # long: its own length field, not short_len
        (long_header(GREASE_VERSION, bytes(40), b""), 8, bytes(40)),  # invariants only: 40 is fine
        (b"\x80" + QUIC_V1.to_bytes(4, "big") + b"\x00", 8, b""),  # zero-length DCID
        (b"\x00" + CID20, 8, CID20[:8]),  # fixed bit clear: version policy, not this cut
    ],
    ids=["short", "short-own-length", "long-initial", "long-unknown-version", "long-empty-dcid", "no-fixed-bit"],
)
def test_dcid_of_untrusted_cuts_the_first_packets_dcid(datagram: bytes, short_len: int, expected: bytes) -> None:
    assert dcid_of_untrusted(datagram, short_len) == expected
    assert dcid_of_untrusted(memoryview(datagram), short_len) == expected


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"", "empty"),
        (b"\x40" + bytes(7), "truncated"),  # one byte short of an 8-byte DCID
        (b"\xc0\x00\x00\x00\x01", "truncated"),  # no DCID length yet
        (b"\xc0\x00\x00\x00\x01\x08" + bytes(7), "truncated"),  # DCID runs past the end
    ],
    ids=["empty", "short-truncated", "long-no-length", "long-dcid-overrun"],
)
def test_dcid_of_untrusted_raises_only_malformed(datagram: bytes, reason: str) -> None:
    with pytest.raises(MalformedDatagram) as info:
        dcid_of_untrusted(datagram, 8)
    assert info.value.reason == reason


@given(st.binary(max_size=64), st.integers(0, MAX_CID_LEN_V1))
def test_dcid_of_untrusted_agrees_with_the_full_parser(data: bytes, short_len: int) -> None:
    # Any bytes: a DCID or MalformedDatagram, and whenever the full parser accepts the
    # datagram the cheap cut finds the same DCID (short headers: cut at the caller's length).
    try:
        dcid = dcid_of_untrusted(data, short_len)
    except MalformedDatagram:
        dcid = None
    try:
        fields = parse_routing_fields_untrusted(data)
    except MalformedDatagram:
        return
    if fields.is_long:
        assert dcid == fields.dcid
    elif len(data) >= 1 + short_len:
        assert dcid == fields.dcid[:short_len]
