"""The packets a stateless party may send without a connection: Retry and Stateless Reset.

* :func:`initial_token` reads the Token field of a v1/v2 Initial (RFC 9000
  §17.2.2): the only field past the SCID the LB ever reads.
* :func:`build_retry` writes a Retry packet with its integrity tag (RFC 9001
  §5.8, RFC 9369 §3.3.3 for v2).
* :func:`reset_token` derives the stateless reset token of a CID from the
  service's reset key *and the server ID of the backend that issued it*
  (RFC 9000 §10.3.2, §21.11): a backend that computes tokens for another
  backend's CID gets the wrong ones, so no backend can reset another's
  connections (acceptance S-5). The LB, which holds the key, resets CIDs of
  removed backends; a restarted backend resets its own CIDs it has forgotten.
* :func:`build_reset` writes a Stateless Reset (RFC 9000 §10.3): shorter than
  the packet that triggered it, never under 21 bytes.

Sans-IO: randomness comes in as bytes.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lb.core.quic_constants import QUIC_V2

__all__ = [
    "MIN_RESET_LEN",
    "RESET_TOKEN_LEN",
    "build_reset",
    "build_retry",
    "initial_token",
    "reset_token",
    "retry_integrity_tag",
]

RESET_TOKEN_LEN = 16
#: 5 unpredictable bytes (first octet included) and the token (RFC 9000 §10.3).
MIN_RESET_LEN = 5 + RESET_TOKEN_LEN
#: A reset need not be longer than this to look like a short-header packet of ours.
MAX_RESET_LEN = 43

_RETRY_AEAD = {
    1: (AESGCM(bytes.fromhex("be0c690b9f66575a1d766b54e368c84e")), bytes.fromhex("461599d35d632bf2239825bb")),
    QUIC_V2: (AESGCM(bytes.fromhex("8fb4b01b56ac48e260fbcbcead7ccc92")), bytes.fromhex("d86969bc2d7c6d9990efb04a")),
}
#: Long packet type bits of Retry: 0b11 in v1, 0b00 in v2 (RFC 9369 §3.2).
_RETRY_TYPE = {1: 0b11, QUIC_V2: 0b00}
_RESET_LABEL = b"quiclb stateless reset\x00"


def initial_token(datagram: bytes, dcid_len: int, scid_len: int) -> bytes | None:
    """The Token of the Initial at the start of ``datagram``; None when the field does not fit.

    The caller has parsed the header up to the SCID (:mod:`lb.core.quic_header`)
    and knows the packet is a v1/v2 Initial.
    """
    at = 7 + dcid_len + scid_len  # first octet, version, two length octets
    if at >= len(datagram):
        return None
    prefix = datagram[at] >> 6
    size = 1 << prefix
    if at + size > len(datagram):
        return None
    length = datagram[at] & 0x3F
    for i in range(1, size):
        length = (length << 8) | datagram[at + i]
    start = at + size
    if start + length > len(datagram):
        return None
    return datagram[start : start + length]


def retry_integrity_tag(packet_without_tag: bytes, odcid: bytes, version: int) -> bytes:
    """The Retry Integrity Tag over the Retry pseudo-packet (RFC 9001 §5.8)."""
    aead, nonce = _RETRY_AEAD[version]
    return aead.encrypt(nonce, b"", bytes((len(odcid),)) + odcid + packet_without_tag)


def build_retry(version: int, *, client_scid: bytes, retry_scid: bytes, odcid: bytes, token: bytes,
                unused_bits: int) -> bytes:
    """A Retry for an Initial of ``version`` whose DCID was ``odcid`` and SCID ``client_scid``."""
    if version not in _RETRY_TYPE:
        raise ValueError(f"version: Retry is defined for v1 and v2 only, got 0x{version:08x}")
    first = 0xC0 | (_RETRY_TYPE[version] << 4) | (unused_bits & 0x0F)
    packet = (
        bytes((first,)) + version.to_bytes(4, "big")
        + bytes((len(client_scid),)) + client_scid
        + bytes((len(retry_scid),)) + retry_scid
        + token
    )
    return packet + retry_integrity_tag(packet, odcid, version)


def reset_token(key: bytes, server_id: bytes, cid: bytes) -> bytes:
    """The stateless reset token of ``cid``, issued by the backend with ``server_id``."""
    message = _RESET_LABEL + bytes((len(server_id),)) + server_id + cid
    return hmac.new(key, message, hashlib.sha256).digest()[:RESET_TOKEN_LEN]


def reset_length(trigger_len: int) -> int | None:
    """How long a reset answering a ``trigger_len``-byte packet is; None when it cannot be smaller."""
    length = min(trigger_len - 1, MAX_RESET_LEN)
    return length if length >= MIN_RESET_LEN else None


def build_reset(token: bytes, length: int, random_bytes: bytes) -> bytes:
    """A Stateless Reset of ``length`` bytes: short-header form, random bits, then the token.

    ``random_bytes`` supplies the unpredictable part (``length - 16`` bytes).
    """
    if len(token) != RESET_TOKEN_LEN or length < MIN_RESET_LEN:
        raise ValueError(f"reset: token of {RESET_TOKEN_LEN} bytes and length >= {MIN_RESET_LEN} required")
    head = random_bytes[: length - RESET_TOKEN_LEN]
    if len(head) != length - RESET_TOKEN_LEN:
        raise ValueError(f"reset: need {length - RESET_TOKEN_LEN} random bytes, got {len(random_bytes)}")
    first = 0x40 | (head[0] & 0x3F)  # 0b01xxxxxx: a short header (RFC 9000 §10.3)
    return bytes((first,)) + head[1:] + token
