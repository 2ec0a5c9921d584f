"""PROXY protocol v2 codec for the LB <-> backend leg (design §4; a wire contract).

The format is HAProxy's binary PROXY protocol, version 2 (proxy-protocol.txt
§2.2), restricted to what a UDP load balancer needs:

    offset  size  field
    0       12    signature  \\r\\n\\r\\n\\x00\\r\\nQUIT\\n
    12      1     version (high nibble, always 2) | command (low nibble: 0 LOCAL, 1 PROXY)
    13      1     family (high nibble: 1 INET, 2 INET6) | transport (low nibble: 2 DGRAM)
    14      2     length of everything after these 16 bytes, big-endian
    16      12|36 source address, destination address, source port, destination port
    ...           TLVs: type (1 byte), length (2 bytes, big-endian), value

*Source* is the client and *destination* the VIP, in both directions: on the
way in the backend learns the real client address; on the way back the LB
learns where to send the reply and from which VIP socket. Whatever follows
the header is the client's datagram, untouched and opaque, even when it starts
with a PROXY signature itself (acceptance A-7): only the outer header is read.

Rules:

1. Functions ending in ``_untrusted`` raise :class:`~lb.errors.MalformedDatagram`
   and nothing else; ``reason`` is one of ``"proxy_signature"``,
   ``"proxy_version"``, ``"proxy_command"``, ``"proxy_local"``,
   ``"proxy_family"``, ``"proxy_length"``, ``"proxy_tlv"``, ``"truncated"``.
2. Encoders take trusted values from our own code and raise ``ValueError`` on
   a programming error (bad address text, port out of range, mixed families).
3. No ``socket`` in the core: addresses are converted with :mod:`ipaddress`
   behind bounded caches, so a flood of distinct addresses cannot grow memory.

IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``): aioquic binds dual-stack
``::`` sockets and reports IPv4 peers in that form. When one address of a pair
is IPv4 and the other is IPv4-mapped (or both are mapped), the mapped one is
written as plain IPv4, because a PROXY header carries a single family. A mapped
address paired with a genuine IPv6 address stays IPv6. Decoding never maps
back: an INET header yields dotted-quad text.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

from lb.errors import MalformedDatagram

__all__ = [
    "PROXY_V2_HEADER_LEN_INET",
    "PROXY_V2_HEADER_LEN_INET6",
    "PROXY_V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderEncoder",
    "decapsulate_untrusted",
    "decode_proxy_header_untrusted",
    "encapsulate",
    "encode_proxy_header",
]

#: The 12-byte magic that opens every v2 header (proxy-protocol.txt §2.2).
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# Fixed part after the signature (proxy-protocol.txt §2.2), field by field:
#   B  version and command: 0x21 = version 2, PROXY; 0x20 = version 2, LOCAL
#   B  family and transport: 0x12 = AF_INET + DGRAM; 0x22 = AF_INET6 + DGRAM
#   H  length in bytes of the address block and TLVs that follow, network order
_FIXED = struct.Struct(">BBH")
_PREAMBLE_LEN = len(PROXY_V2_SIGNATURE) + _FIXED.size  # 16

_VERSION_2 = 0x2
_COMMAND_LOCAL = 0x0
_COMMAND_PROXY = 0x1
_VER_CMD_PROXY = (_VERSION_2 << 4) | _COMMAND_PROXY  # 0x21
_FAM_INET_DGRAM = 0x12
_FAM_INET6_DGRAM = 0x22

# Address blocks (proxy-protocol.txt §2.2, "ipv4_addr" / "ipv6_addr"): the two
# addresses, then the two ports, all in network order.
_PORTS = struct.Struct(">HH")
_INET_ADDR_LEN = 4 + 4 + _PORTS.size  # 12
_INET6_ADDR_LEN = 16 + 16 + _PORTS.size  # 36
_ADDR_LEN = {_FAM_INET_DGRAM: _INET_ADDR_LEN, _FAM_INET6_DGRAM: _INET6_ADDR_LEN}

#: Header sizes without TLVs, in bytes.
PROXY_V2_HEADER_LEN_INET = _PREAMBLE_LEN + _INET_ADDR_LEN  # 28
PROXY_V2_HEADER_LEN_INET6 = _PREAMBLE_LEN + _INET6_ADDR_LEN  # 52

# TLV header: type (1 byte), length (2 bytes), network order.
_TLV = struct.Struct(">BH")
_MAX_LENGTH_FIELD = 0xFFFF

#: Entries kept by each address cache; when full the oldest entry is evicted.
DEFAULT_CACHE_SIZE = 65536


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One decoded PROXY v2 header (command PROXY, transport DGRAM)."""

    #: The client: (IP address text, UDP port).
    source: tuple[str, int]
    #: The VIP the client sent to: (IP address text, UDP port).
    destination: tuple[str, int]
    #: Every TLV in wire order as (type, value); callers ignore types they do not know.
    tlvs: tuple[tuple[int, bytes], ...] = ()


# Hot-path constructor: a frozen dataclass's __init__ pays object.__setattr__
# per field; writing the slots through their member descriptors builds the
# identical immutable object for about half the cost (decoding runs once per
# datagram on backends and on the LB's return path). The assert keeps the
# setters in step with the class.
_HEADER_FIELD_NAMES = ("source", "destination", "tlvs")
assert tuple(f.name for f in fields(ProxyHeader)) == _HEADER_FIELD_NAMES
_new_header = object.__new__
_set_source, _set_destination, _set_tlvs = (getattr(ProxyHeader, n).__set__ for n in _HEADER_FIELD_NAMES)


def _make_header(
    source: tuple[str, int], destination: tuple[str, int], tlvs: tuple[tuple[int, bytes], ...]
) -> ProxyHeader:
    obj: ProxyHeader = _new_header(ProxyHeader)
    _set_source(obj, source)
    _set_destination(obj, destination)
    _set_tlvs(obj, tlvs)
    return obj


_K = TypeVar("_K")
_V = TypeVar("_V")


class _BoundedCache(Generic[_K, _V]):
    """A dict with FIFO eviction: O(1), no per-hit bookkeeping, memory capped.

    FIFO rather than LRU keeps hits free of writes; a churn of distinct keys
    only costs misses, never memory.
    """

    __slots__ = ("_data", "_max_entries")

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max_entries = max_entries
        # OrderedDict.popitem(last=False) is O(1); deleting a plain dict's first key is not
        # (later iterations walk over the holes it leaves).
        self._data: OrderedDict[_K, _V] = OrderedDict()

    def get(self, key: _K) -> _V | None:
        return self._data.get(key)

    def put(self, key: _K, value: _V) -> None:
        data = self._data
        if len(data) >= self._max_entries:
            data.popitem(last=False)
        data[key] = value

    def __len__(self) -> int:
        return len(self._data)


def _pack_pair(source_ip: str, destination_ip: str) -> tuple[int, bytes, bytes]:
    """Return (family/transport byte, packed source, packed destination)."""
    src = ipaddress.ip_address(source_ip)
    dst = ipaddress.ip_address(destination_ip)
    if src.version != dst.version or (src.version == 6 and _mapped(src) and _mapped(dst)):
        # One family per header: map IPv4-mapped IPv6 down to IPv4 (module docstring).
        src4 = src if isinstance(src, ipaddress.IPv4Address) else _mapped(src)
        dst4 = dst if isinstance(dst, ipaddress.IPv4Address) else _mapped(dst)
        if src4 is None or dst4 is None:
            raise ValueError(
                f"source {source_ip!r} and destination {destination_ip!r} are not the same address family"
            )
        return _FAM_INET_DGRAM, src4.packed, dst4.packed
    if src.version == 4:
        return _FAM_INET_DGRAM, src.packed, dst.packed
    return _FAM_INET6_DGRAM, src.packed, dst.packed


def _mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    return address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None


def _encode_tlvs(tlvs: Sequence[tuple[int, bytes]]) -> bytes:
    parts: list[bytes] = []
    for tlv_type, value in tlvs:
        if not 0 <= tlv_type <= 0xFF:
            raise ValueError(f"TLV type must be 0..255, got {tlv_type}")
        if len(value) > _MAX_LENGTH_FIELD:
            raise ValueError(f"TLV value of {len(value)} bytes exceeds 65535")
        parts.append(_TLV.pack(tlv_type, len(value)))
        parts.append(bytes(value))
    return b"".join(parts)


def _pack_ports(source_port: int, destination_port: int) -> bytes:
    try:
        return _PORTS.pack(source_port, destination_port)
    except struct.error:
        raise ValueError(f"ports must be 0..65535, got {source_port} and {destination_port}") from None


class ProxyHeaderEncoder:
    """Encodes headers per datagram with the address work cached.

    The packed signature, fixed fields and both addresses are cached per
    (source IP, destination IP) pair, so a hit costs one dict lookup, one
    ``struct.pack`` of the ports and a concatenation. The cache is bounded
    (``max_entries``, FIFO eviction) because source addresses come from the
    network and may be spoofed.
    """

    __slots__ = ("_prefixes",)

    def __init__(self, max_entries: int = DEFAULT_CACHE_SIZE) -> None:
        self._prefixes: _BoundedCache[tuple[str, str], bytes] = _BoundedCache(max_entries)

    def _prefix(self, source_ip: str, destination_ip: str) -> bytes:
        key = (source_ip, destination_ip)
        prefix = self._prefixes.get(key)
        if prefix is None:
            family, src, dst = _pack_pair(source_ip, destination_ip)
            prefix = (
                PROXY_V2_SIGNATURE
                + _FIXED.pack(_VER_CMD_PROXY, family, _ADDR_LEN[family])
                + src
                + dst
            )
            self._prefixes.put(key, prefix)
        return prefix

    def encode(self, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
        """The header, without TLVs, for a datagram from ``source`` to ``destination``."""
        return self._prefix(source[0], destination[0]) + _pack_ports(source[1], destination[1])

    def encapsulate(
        self, source: tuple[str, int], destination: tuple[str, int], payload: bytes | memoryview
    ) -> bytes:
        """Header plus ``payload``, ready to send."""
        return b"".join(
            (self._prefix(source[0], destination[0]), _pack_ports(source[1], destination[1]), payload)
        )

    def cache_len(self) -> int:
        """Number of cached address pairs (for tests and metrics)."""
        return len(self._prefixes)


_DEFAULT_ENCODER = ProxyHeaderEncoder()


def encode_proxy_header(
    source: tuple[str, int],
    destination: tuple[str, int],
    tlvs: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """Encode a PROXY v2 header (command PROXY, transport DGRAM).

    ``source`` is the client and ``destination`` the VIP, each as (IP text,
    port). Raises ``ValueError`` for invalid addresses or ports, mixed
    families, or TLVs that do not fit the 16-bit length field.
    """
    if not tlvs:
        return _DEFAULT_ENCODER.encode(source, destination)
    family, src, dst = _pack_pair(source[0], destination[0])
    tlv_bytes = _encode_tlvs(tlvs)
    length = _ADDR_LEN[family] + len(tlv_bytes)
    if length > _MAX_LENGTH_FIELD:
        raise ValueError(f"header body of {length} bytes exceeds the 16-bit length field")
    return b"".join(
        (
            PROXY_V2_SIGNATURE,
            _FIXED.pack(_VER_CMD_PROXY, family, length),
            src,
            dst,
            _pack_ports(source[1], destination[1]),
            tlv_bytes,
        )
    )


def encapsulate(
    source: tuple[str, int], destination: tuple[str, int], payload: bytes | memoryview
) -> bytes:
    """A PROXY v2 header for ``source`` -> ``destination`` followed by ``payload``."""
    return _DEFAULT_ENCODER.encapsulate(source, destination, payload)


# Decoded IPv6 text per packed address; IPv4 is formatted directly (cheaper than a lookup).
_IPV6_TEXT: _BoundedCache[bytes, str] = _BoundedCache(DEFAULT_CACHE_SIZE)


def _ipv6_text(packed: bytes) -> str:
    text = _IPV6_TEXT.get(packed)
    if text is None:
        text = str(ipaddress.IPv6Address(packed))  # compressed form (RFC 5952)
        _IPV6_TEXT.put(packed, text)
    return text


def decode_proxy_header_untrusted(data: bytes | memoryview) -> tuple[ProxyHeader, int]:
    """Decode the PROXY v2 header at the start of ``data``.

    Returns the header and its total length in bytes; the payload is
    ``data[length:]``. Only command PROXY with INET or INET6 over DGRAM is
    accepted: LOCAL carries no client address, so it has no meaning on a
    path whose whole purpose is to carry one (``"proxy_local"``).

    Raises :class:`MalformedDatagram` and nothing else.
    """
    size = len(data)
    if size < _PREAMBLE_LEN:
        head = bytes(data[: len(PROXY_V2_SIGNATURE)])
        if PROXY_V2_SIGNATURE.startswith(head):
            raise MalformedDatagram("truncated", f"PROXY header of {size} bytes")
        raise MalformedDatagram("proxy_signature")
    if data[: len(PROXY_V2_SIGNATURE)] != PROXY_V2_SIGNATURE:
        raise MalformedDatagram("proxy_signature")
    ver_cmd, fam, length = _FIXED.unpack_from(data, len(PROXY_V2_SIGNATURE))

    # proxy-protocol.txt §2.2: "the receiver must only accept" version 2, and
    # must drop unassigned commands.
    if ver_cmd >> 4 != _VERSION_2:
        raise MalformedDatagram("proxy_version", f"0x{ver_cmd:02x}")
    command = ver_cmd & 0x0F
    if command == _COMMAND_LOCAL:
        raise MalformedDatagram("proxy_local")
    if command != _COMMAND_PROXY:
        raise MalformedDatagram("proxy_command", f"0x{ver_cmd:02x}")
    addr_len = _ADDR_LEN.get(fam)
    if addr_len is None:
        raise MalformedDatagram("proxy_family", f"0x{fam:02x}")

    total = _PREAMBLE_LEN + length
    if size < total:
        raise MalformedDatagram("truncated", f"PROXY header of {total} bytes in {size}")
    if length < addr_len:
        raise MalformedDatagram("proxy_length", f"{length} bytes for a {addr_len}-byte address block")

    a = _PREAMBLE_LEN
    if addr_len == _INET_ADDR_LEN:
        # Dotted quad formatted directly: same text as ipaddress, without the object.
        src_ip = f"{data[a]}.{data[a + 1]}.{data[a + 2]}.{data[a + 3]}"
        dst_ip = f"{data[a + 4]}.{data[a + 5]}.{data[a + 6]}.{data[a + 7]}"
        ports_at = a + 8
    else:
        src_ip = _ipv6_text(bytes(data[a : a + 16]))
        dst_ip = _ipv6_text(bytes(data[a + 16 : a + 32]))
        ports_at = a + 32
    src_port, dst_port = _PORTS.unpack_from(data, ports_at)

    tlvs: tuple[tuple[int, bytes], ...] = ()
    if length > addr_len:
        tlvs = _decode_tlvs_untrusted(data, a + addr_len, total)
    return _make_header((src_ip, src_port), (dst_ip, dst_port), tlvs), total


def _decode_tlvs_untrusted(data: bytes | memoryview, start: int, end: int) -> tuple[tuple[int, bytes], ...]:
    """Split ``data[start:end]`` into TLVs; each must fit inside the header."""
    out: list[tuple[int, bytes]] = []
    at = start
    while at < end:
        if end - at < _TLV.size:
            raise MalformedDatagram("proxy_tlv", f"{end - at} stray bytes at offset {at}")
        tlv_type, tlv_len = _TLV.unpack_from(data, at)
        value_at = at + _TLV.size
        if value_at + tlv_len > end:
            raise MalformedDatagram(
                "proxy_tlv", f"TLV 0x{tlv_type:02x} of {tlv_len} bytes overruns the header"
            )
        out.append((tlv_type, bytes(data[value_at : value_at + tlv_len])))
        at = value_at + tlv_len
    return tuple(out)


def decapsulate_untrusted(data: bytes | memoryview) -> tuple[ProxyHeader, bytes]:
    """Split an encapsulated datagram into its header and the opaque payload bytes."""
    header, length = decode_proxy_header_untrusted(data)
    return header, bytes(data[length:])
