"""QUIC datagram builders for tests and benchmarks: named fields in, bytes out.

Pure functions, no sockets, no randomness unless the caller passes it in, so
a failing test prints bytes that reproduce. The packets are well formed up to
the fields a load balancer reads (RFC 8999 invariants plus the v1/v2 long
header's token and Length fields); the packet number and payload are zero
padding, not protected QUIC.
"""

from __future__ import annotations

from collections.abc import Iterable

from lb.core.quic_constants import GREASE_VERSION, INITIAL_TYPE_BITS, MAX_CID_LEN_INVARIANT, MIN_INITIAL_DATAGRAM

__all__ = [
    "initial",
    "long_header",
    "short_header",
    "version_negotiation",
    "vn_probe",
]

_MAX_VARINT2 = 0x3FFF  # largest value of a 2-byte variable-length integer (RFC 9000 §16)

# Initial's wire type bits come from INITIAL_TYPE_BITS (v1 0b00, v2 0b01). Other
# versions are built with the v1 layout, as aioquic parses them for Version Negotiation.


def _check_cid(name: str, cid: bytes) -> None:
    if len(cid) > MAX_CID_LEN_INVARIANT:
        raise ValueError(f"{name} of {len(cid)} bytes does not fit a one-byte length")


def long_header(
    version: int,
    dcid: bytes,
    scid: bytes,
    *,
    packet_type: int = 0,
    pad_to: int | None = None,
    first_byte: int | None = None,
    payload: bytes = b"",
    token: bytes | None = None,
) -> bytes:
    """A long-header packet (RFC 9000 §17.2).

    ``packet_type`` is the *wire* value of the two type bits (note that v2
    permutes them, RFC 9369 §3.2; see :func:`initial`). ``first_byte``
    overrides the whole first octet (``0x80`` gives a clear fixed bit).

    The Initial layout is used when the type bits mean Initial for
    ``version`` (any version other than v2 counts type 0 as Initial, like the
    VN probe recipe): a token length varint (``token``, default empty) and
    then the Length field. Other types get the Length field only.

    The Length field is a 2-byte varint covering ``payload`` and the zero
    padding that brings the datagram to ``pad_to`` bytes, so the packet can be
    coalesced with another one (RFC 9000 §12.2).
    """
    _check_cid("dcid", dcid)
    _check_cid("scid", scid)
    if not 0 <= packet_type <= 3:
        raise ValueError(f"packet_type must be 0..3, got {packet_type}")
    first = 0xC0 | (packet_type << 4) if first_byte is None else first_byte
    head = bytearray()
    head.append(first)
    head += version.to_bytes(4, "big")
    head.append(len(dcid))
    head += dcid
    head.append(len(scid))
    head += scid
    is_initial_layout = packet_type == INITIAL_TYPE_BITS.get(version, 0)
    if is_initial_layout:
        token = token or b""
        head += _varint(len(token))
        head += token
    elif token is not None:
        raise ValueError("a token only exists in Initial packets")
    rest_len = len(payload)
    if pad_to is not None:
        rest_len = max(rest_len, pad_to - len(head) - 2)
    if rest_len > _MAX_VARINT2:
        raise ValueError(f"Length of {rest_len} does not fit a 2-byte varint")
    head += (0x4000 | rest_len).to_bytes(2, "big")
    head += payload
    head += bytes(rest_len - len(payload))
    return bytes(head)


def initial(
    version: int,
    dcid: bytes,
    scid: bytes,
    *,
    pad_to: int = MIN_INITIAL_DATAGRAM,
    token: bytes = b"",
) -> bytes:
    """A client Initial for ``version`` (v1 or v2 type bits), padded to ``pad_to`` bytes."""
    return long_header(
        version, dcid, scid, packet_type=INITIAL_TYPE_BITS.get(version, 0), pad_to=pad_to, token=token
    )


def short_header(dcid: bytes, payload_len: int = 32, first_byte: int = 0x41) -> bytes:
    """A 1-RTT short-header packet (RFC 9000 §17.3.1): first octet, DCID, zero bytes.

    The default first octet has the fixed bit set and a 2-byte packet number
    length; ``first_byte=0x01`` gives a clear fixed bit.
    """
    if payload_len < 0:
        raise ValueError(f"payload_len must be >= 0, got {payload_len}")
    return bytes([first_byte]) + dcid + bytes(payload_len)


def version_negotiation(
    dcid: bytes, scid: bytes, versions: Iterable[int], first_byte: int = 0xC0
) -> bytes:
    """A Version Negotiation packet (RFC 8999 §6): version 0, CIDs, 32-bit versions.

    The low seven bits of the first octet are arbitrary on the wire; servers
    set 0x40 (RFC 9000 §17.2.1), hence the default 0xC0.
    """
    _check_cid("dcid", dcid)
    _check_cid("scid", scid)
    return b"".join(
        (
            bytes([first_byte]),
            bytes(4),
            bytes([len(dcid)]),
            dcid,
            bytes([len(scid)]),
            scid,
            *(v.to_bytes(4, "big") for v in versions),
        )
    )


def vn_probe(
    nonce: bytes, *, low_bits: int = 0, scid: bytes = b"", version: int = GREASE_VERSION
) -> bytes:
    """A health probe that draws a VN reply (aioquic-integration.md §4 recipe).

    First octet ``0xC0 | low_bits`` (type bits 00: the Initial layout), a
    greased version, ``nonce`` as the DCID (echoed back as the VN's SCID),
    token length 0, and a 2-byte Length padding the datagram to 1200 bytes so
    it stays valid under RFC 9000 §5.2.2. ``low_bits`` are the four
    unprotected low bits; callers that want them random pass them in.
    """
    if not 8 <= len(nonce) <= 20:
        raise ValueError(f"nonce must be 8..20 bytes, got {len(nonce)}")
    if not 0 <= low_bits <= 0x0F:
        raise ValueError(f"low_bits must be 0..15, got {low_bits}")
    return long_header(
        version, nonce, scid, packet_type=0, pad_to=MIN_INITIAL_DATAGRAM, first_byte=0xC0 | low_bits
    )


def _varint(value: int) -> bytes:
    """Encode ``value`` as a QUIC variable-length integer (RFC 9000 §16)."""
    if value <= 0x3F:
        return value.to_bytes(1, "big")
    if value <= 0x3FFF:
        return (0x4000 | value).to_bytes(2, "big")
    if value <= 0x3FFFFFFF:
        return (0x80000000 | value).to_bytes(4, "big")
    if value <= 0x3FFFFFFFFFFFFFFF:
        return (0xC000000000000000 | value).to_bytes(8, "big")
    raise ValueError(f"{value} does not fit a varint")
