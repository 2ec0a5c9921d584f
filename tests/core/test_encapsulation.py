"""PROXY protocol v2 codec: wire layout, round trips, hostile input (A-7, S-8)."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.core.encapsulation import (
    PROXY_V2_HEADER_LEN_INET,
    PROXY_V2_HEADER_LEN_INET6,
    PROXY_V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderEncoder,
    decapsulate_untrusted,
    decode_proxy_header_untrusted,
    encapsulate,
    encode_proxy_header,
)
from lb.errors import MalformedDatagram
from quiclb_harness.datagrams import initial

CLIENT4 = ("192.0.2.10", 50123)
VIP4 = ("198.51.100.1", 443)
CLIENT6 = ("2001:db8::10", 50123)
VIP6 = ("2001:db8:1::1", 443)


def _raw(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    """A hand-built header, so the tests do not trust the encoder."""
    n = len(body) if length is None else length
    return PROXY_V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack(">H", n) + body


V4_BODY = bytes([192, 0, 2, 10, 198, 51, 100, 1]) + struct.pack(">HH", 50123, 443)
V6_BODY = (
    ipaddress.IPv6Address("2001:db8::10").packed
    + ipaddress.IPv6Address("2001:db8:1::1").packed
    + struct.pack(">HH", 50123, 443)
)

# --- wire layout (the contract) --------------------------------------------------


def test_signature() -> None:
    assert PROXY_V2_SIGNATURE == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"


def test_ipv4_layout() -> None:
    header = encode_proxy_header(CLIENT4, VIP4)
    assert len(header) == PROXY_V2_HEADER_LEN_INET == 28
    assert header == _raw(0x21, 0x12, V4_BODY)


def test_ipv6_layout() -> None:
    header = encode_proxy_header(CLIENT6, VIP6)
    assert len(header) == PROXY_V2_HEADER_LEN_INET6 == 52
    assert header == _raw(0x21, 0x22, V6_BODY)


def test_tlv_layout() -> None:
    header = encode_proxy_header(CLIENT4, VIP4, [(0xE0, b"abc"), (0x04, b"")])
    assert header == _raw(0x21, 0x12, V4_BODY + b"\xe0\x00\x03abc" + b"\x04\x00\x00")


# --- decoding ------------------------------------------------------------------


def test_decode_ipv4() -> None:
    payload = initial(1, b"\x01" * 8, b"")
    header, length = decode_proxy_header_untrusted(_raw(0x21, 0x12, V4_BODY) + payload)
    assert header == ProxyHeader(CLIENT4, VIP4)
    assert length == 28


def test_decode_ipv6_compressed_text() -> None:
    header, length = decode_proxy_header_untrusted(_raw(0x21, 0x22, V6_BODY))
    assert header == ProxyHeader(CLIENT6, VIP6)
    assert length == 52


def test_tlvs_returned_and_unknown_ones_harmless() -> None:
    tlvs = V4_BODY + b"\x04\x00\x02\x00\x00" + b"\xee\x00\x01Z" + b"\x30\x00\x00"
    data = _raw(0x21, 0x12, tlvs) + b"PAYLOAD"
    header, payload = decapsulate_untrusted(data)
    assert header.source == CLIENT4
    assert header.tlvs == ((0x04, b"\x00\x00"), (0xEE, b"Z"), (0x30, b""))
    assert payload == b"PAYLOAD"


# (description, data, reason)
BAD: list[tuple[str, bytes, str]] = [
    ("empty", b"", "truncated"),
    ("garbage", b"GET / HTTP/1.1\r\n\r\n", "proxy_signature"),
    ("short garbage", b"\x00", "proxy_signature"),
    ("QUIC packet", initial(1, b"\x01" * 8, b""), "proxy_signature"),
    ("v1 text header", b"PROXY UDP4 192.0.2.1 198.51.100.1 1 2\r\n", "proxy_signature"),
    ("version 1 nibble", _raw(0x11, 0x12, V4_BODY), "proxy_version"),
    ("version 3 nibble", _raw(0x31, 0x12, V4_BODY), "proxy_version"),
    ("LOCAL", _raw(0x20, 0x00, b""), "proxy_local"),
    ("LOCAL with addresses", _raw(0x20, 0x12, V4_BODY), "proxy_local"),
    ("command 2", _raw(0x22, 0x12, V4_BODY), "proxy_command"),
    ("command 0xF", _raw(0x2F, 0x12, V4_BODY), "proxy_command"),
    ("UNSPEC family", _raw(0x21, 0x00, b""), "proxy_family"),
    ("TCP4", _raw(0x21, 0x11, V4_BODY), "proxy_family"),
    ("TCP6", _raw(0x21, 0x21, V6_BODY), "proxy_family"),
    ("UNIX DGRAM", _raw(0x21, 0x32, bytes(216)), "proxy_family"),
    ("family 4", _raw(0x21, 0x42, V4_BODY), "proxy_family"),
    ("length beyond data", _raw(0x21, 0x12, V4_BODY, length=13), "truncated"),
    ("length 0xffff", _raw(0x21, 0x22, V6_BODY, length=0xFFFF), "truncated"),
    ("INET length 11", _raw(0x21, 0x12, V4_BODY[:11]), "proxy_length"),
    ("INET length 0", _raw(0x21, 0x12, b""), "proxy_length"),
    ("INET6 length with INET body", _raw(0x21, 0x22, V4_BODY + bytes(20)), "proxy_length"),
    ("stray byte after addresses", _raw(0x21, 0x12, V4_BODY + b"\x01"), "proxy_tlv"),
    ("two stray bytes", _raw(0x21, 0x12, V4_BODY + b"\x01\x00"), "proxy_tlv"),
    ("TLV overruns header", _raw(0x21, 0x12, V4_BODY + b"\x01\x00\x05abcd") + b"e", "proxy_tlv"),
    ("TLV length 0xffff", _raw(0x21, 0x12, V4_BODY + b"\x01\xff\xff") + bytes(70000), "proxy_tlv"),
]


@pytest.mark.parametrize(("data", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_headers(data: bytes, reason: str) -> None:
    for candidate in (data, memoryview(data)):
        with pytest.raises(MalformedDatagram) as info:
            decode_proxy_header_untrusted(candidate)
        assert info.value.reason == reason
        with pytest.raises(MalformedDatagram):
            decapsulate_untrusted(candidate)


@pytest.mark.parametrize(
    "header",
    [
        encode_proxy_header(CLIENT4, VIP4),
        encode_proxy_header(CLIENT6, VIP6),
        encode_proxy_header(CLIENT4, VIP4, [(0xE0, b"x" * 40), (0x04, b"")]),
    ],
    ids=["v4", "v6", "v4-tlvs"],
)
def test_every_truncation_raises_and_trailing_bytes_are_payload(header: bytes) -> None:
    whole, length = decode_proxy_header_untrusted(header)
    assert length == len(header)
    for cut in range(len(header)):
        with pytest.raises(MalformedDatagram) as info:
            decode_proxy_header_untrusted(header[:cut])
        assert info.value.reason == "truncated"
    trailer = b"\xc0\x00\x00\x00\x01" + bytes(100)
    got, payload = decapsulate_untrusted(header + trailer)
    assert got == whole
    assert payload == trailer


def test_forged_inner_header_stays_opaque() -> None:
    # a client datagram that itself starts with a PROXY header naming
    # another "client" is payload; only the LB-written outer header counts.
    forged = encode_proxy_header(("203.0.113.66", 1), ("203.0.113.77", 2)) + b"evil"
    wire = encapsulate(CLIENT4, VIP4, forged)
    header, payload = decapsulate_untrusted(wire)
    assert header == ProxyHeader(CLIENT4, VIP4)
    assert payload == forged
    # Decapsulating once more is the receiver's choice, never ours.
    inner, rest = decapsulate_untrusted(payload)
    assert inner.source == ("203.0.113.66", 1)
    assert rest == b"evil"


def test_empty_payload() -> None:
    header, payload = decapsulate_untrusted(encapsulate(CLIENT6, VIP6, b""))
    assert header == ProxyHeader(CLIENT6, VIP6)
    assert payload == b""


# --- encoding rules -------------------------------------------------------------


def test_ipv4_mapped_source_maps_down() -> None:
    # aioquic's dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d.
    header = encode_proxy_header(("::ffff:192.0.2.10", 50123), VIP4)
    assert header == encode_proxy_header(CLIENT4, VIP4)
    assert len(header) == 28


def test_ipv4_mapped_destination_and_both_mapped() -> None:
    expected = encode_proxy_header(CLIENT4, VIP4)
    assert encode_proxy_header(CLIENT4, ("::ffff:198.51.100.1", 443)) == expected
    assert encode_proxy_header(("::ffff:192.0.2.10", 50123), ("::ffff:198.51.100.1", 443)) == expected


def test_mapped_with_real_ipv6_stays_ipv6() -> None:
    header = encode_proxy_header(("::ffff:192.0.2.10", 50123), VIP6)
    assert len(header) == 52
    decoded, _ = decode_proxy_header_untrusted(header)
    # Compare as addresses: the text form of mapped addresses changed in Python 3.13.
    assert ipaddress.ip_address(decoded.source[0]) == ipaddress.ip_address("::ffff:192.0.2.10")
    assert decoded.source[1] == 50123


@pytest.mark.parametrize(
    ("source", "destination", "tlvs"),
    [
        (CLIENT4, VIP6, []),
        (CLIENT6, VIP4, []),
        (("not-an-ip", 1), VIP4, []),
        (("192.0.2.1", 70000), VIP4, []),
        (("192.0.2.1", -1), VIP4, []),
        (CLIENT4, VIP4, [(256, b"")]),
        (CLIENT4, VIP4, [(1, bytes(65536))]),
        (CLIENT4, VIP4, [(1, bytes(65535))]),  # fits a TLV, not the header length field
    ],
    ids=["v4-v6", "v6-v4", "bad-ip", "port-high", "port-negative", "tlv-type", "tlv-long", "hdr-long"],
)
def test_encode_rejects_programming_errors(
    source: tuple[str, int], destination: tuple[str, int], tlvs: list[tuple[int, bytes]]
) -> None:
    with pytest.raises(ValueError):
        encode_proxy_header(source, destination, tlvs)


def test_encoder_cache_is_bounded() -> None:
    encoder = ProxyHeaderEncoder(max_entries=4)
    for i in range(10):
        source = (f"192.0.2.{i}", 1000 + i)
        header = encoder.encode(source, VIP4)
        assert header == encode_proxy_header(source, VIP4)
        assert encoder.encapsulate(source, VIP4, b"x") == header + b"x"
        assert encoder.cache_len() <= 4
    # Ports are not part of the cache key: a new port reuses the entry.
    encoder.encode(("192.0.2.9", 1), VIP4)
    assert encoder.cache_len() == 4


def test_encoder_accepts_memoryview_payload() -> None:
    payload = bytearray(b"\x40abc")
    wire = ProxyHeaderEncoder().encapsulate(CLIENT4, VIP4, memoryview(payload))
    assert wire[28:] == b"\x40abc"


def test_encoder_rejects_bad_cache_size() -> None:
    with pytest.raises(ValueError):
        ProxyHeaderEncoder(max_entries=0)


# --- hypothesis -------------------------------------------------------------------

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)


def _not_mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Two mapped addresses are deliberately written as IPv4 (see the module docstring).
    return not isinstance(address, ipaddress.IPv6Address) or address.ipv4_mapped is None


ipv6 = st.ip_addresses(v=6).filter(_not_mapped).map(str)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)


@settings(max_examples=300)
@given(ipv4, ports, ipv4, ports, tlv_lists, st.binary(max_size=200))
def test_round_trip_ipv4(
    src: str, sport: int, dst: str, dport: int, tlvs: list[tuple[int, bytes]], payload: bytes
) -> None:
    header_bytes = encode_proxy_header((src, sport), (dst, dport), tlvs)
    if not tlvs:
        assert len(header_bytes) == 28
    header, rest = decapsulate_untrusted(header_bytes + payload)
    assert header == ProxyHeader((src, sport), (dst, dport), tuple(tlvs))
    assert rest == payload


@settings(max_examples=300)
@given(ipv6, ports, ipv6, ports, tlv_lists, st.binary(max_size=200))
def test_round_trip_ipv6(
    src: str, sport: int, dst: str, dport: int, tlvs: list[tuple[int, bytes]], payload: bytes
) -> None:
    header_bytes = encode_proxy_header((src, sport), (dst, dport), tlvs)
    if not tlvs:
        assert len(header_bytes) == 52
    header, rest = decapsulate_untrusted(header_bytes + payload)
    assert header == ProxyHeader((src, sport), (dst, dport), tuple(tlvs))
    assert rest == payload


@settings(max_examples=300)
@given(ipv4, ports, ipv4, ports, st.binary(max_size=200))
def test_encoder_matches_function(src: str, sport: int, dst: str, dport: int, payload: bytes) -> None:
    encoder = ProxyHeaderEncoder()
    assert encoder.encapsulate((src, sport), (dst, dport), payload) == encapsulate(
        (src, sport), (dst, dport), payload
    )


@settings(max_examples=1000)
@given(st.binary(max_size=300))
def test_garbage_only_malformed(data: bytes) -> None:
    try:
        decode_proxy_header_untrusted(data)
    except MalformedDatagram:
        pass


@settings(max_examples=1000)
@given(
    st.sampled_from([0x20, 0x21, 0x22, 0x11, 0x2F]),
    st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0xFF]),
    st.integers(0, 0xFFFF),
    st.binary(max_size=300),
)
def test_forged_headers_only_malformed(ver_cmd: int, fam: int, length: int, body: bytes) -> None:
    # Valid signature, forged fields: reach every branch past the signature.
    data = _raw(ver_cmd, fam, body, length=length)
    try:
        header, total = decode_proxy_header_untrusted(data)
    except MalformedDatagram:
        return
    assert total == 16 + length <= len(data)
    assert isinstance(header, ProxyHeader)


@settings(max_examples=300)
@given(st.binary(max_size=120), st.binary(max_size=120))
def test_body_lengths_consistent(body: bytes, payload: bytes) -> None:
    # Length field equals the body: parse succeeds only on a well-formed TLV chain,
    # and the payload is always exactly what follows the declared length.
    data = _raw(0x21, 0x12, body) + payload
    try:
        header, rest = decapsulate_untrusted(data)
    except MalformedDatagram:
        return
    assert rest == payload
    assert 12 + sum(3 + len(v) for _, v in header.tlvs) == len(body)


def test_fast_constructed_header_behaves_like_the_dataclass() -> None:
    # The decoder builds ProxyHeader without __init__ (hot path).
    header, _ = decode_proxy_header_untrusted(encode_proxy_header(CLIENT4, VIP4, [(1, b"a")]))
    assert header == ProxyHeader(CLIENT4, VIP4, ((1, b"a"),))
    assert hash(header) == hash(ProxyHeader(CLIENT4, VIP4, ((1, b"a"),)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        header.source = CLIENT6  # type: ignore[misc]
