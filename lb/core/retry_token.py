"""Shared-state Retry tokens (draft-ietf-quic-retry-offload, "Shared-State Retry Offload").

The LB and the backends hold the same token key, so either may mint a Retry
token and either may check one; nothing is remembered between the Retry and
the Initial that brings the token back.

Wire image (the draft's text, which is normative here)::

    Token {
      Token Type (1) = 0 (Retry),  Key Sequence (7),
      Unique Token Number (96),          -- random, in clear, bound by the AEAD
      Encrypted Body (..),               -- AES-128-GCM under key, nonce = IV xor token number
      AEAD Integrity Check Value (128),
    }
    Body { Timestamp (64) = expiry, POSIX seconds; ODCIL (8) = 8..20; ODCID; Port (16) }
    Associated data { Client IP (128, IPv4 zero-padded on the right); first octet;
                      token number; RSCIL (8); Retry Source CID }

So a token only opens for the client IP it was issued to and for the DCID the
retried Initial carries (the Retry's SCID); the port and the expiry are
checked after decryption.

Erratum: the draft's "Shared State Retry Token Test Vectors" encode an older
layout (body ``ODCIL | RSCIL | port | ODCID | RSCID | timestamp`` and
associated data ``IP | token number | first octet``). Their nonce derivation
and AEAD agree with ours and ``tests/core/test_retry_token.py`` decrypts them
with that layout; the token we write follows the text.

The 16-byte key from ``quiclb keygen`` is the AES key; the 96-bit IV the draft's
configuration agent would provision is derived from it (HMAC-SHA256 with a
fixed label), so one key file configures both ends.

Sans-IO: the caller passes the time and the random token number.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lb.core.addresses import Address

__all__ = [
    "MAX_TOKENS_PER_KEY",
    "TOKEN_LIFETIME",
    "TokenKey",
    "TokenResult",
    "client_ip_bytes",
    "make_retry_token",
    "open_retry_token",
]

#: Seconds a token stays valid after it is minted; clients return it one RTT later.
TOKEN_LIFETIME = 3
#: Clock skew tolerated between the LB and the backends (the draft: do not expire tokens
#: whose timestamp is less than two seconds in the past).
CLOCK_SKEW = 2
#: AES-GCM with random 96-bit nonces: stay far below the birthday bound (acceptance S-9).
MAX_TOKENS_PER_KEY = 1 << 23
TOKEN_NUMBER_LEN = 12
TAG_LEN = 16
MIN_ODCID_LEN, MAX_ODCID_LEN = 8, 20
_BODY_HEAD = struct.Struct(">QB")  # timestamp, ODCIL
_IV_LABEL = b"quiclb retry-offload token iv"


class TokenResult(StrEnum):
    """Why a token was accepted or refused; the label of ``retry_tokens{result}``."""

    VALID = "valid"
    MALFORMED = "malformed"  # too short, or a field out of range
    UNKNOWN_KEY = "unknown_key"  # another key sequence, or a NEW_TOKEN (type 1) token: we never mint them
    INVALID = "invalid"  # the AEAD check failed: another key, another client IP, another DCID, or forged
    EXPIRED = "expired"
    WRONG_ADDRESS = "wrong_address"  # opened, but issued to another client port


@dataclass(frozen=True)
class TokenKey:
    """One token key: AES-128 key, its IV and its 7-bit key sequence."""

    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)
    sequence: int = 0
    aead: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.key) != 16:
            raise ValueError(f"retry token key: must be 16 bytes (AES-128), got {len(self.key)}")
        if len(self.iv) != TOKEN_NUMBER_LEN:
            raise ValueError(f"retry token IV: must be {TOKEN_NUMBER_LEN} bytes, got {len(self.iv)}")
        if not 0 <= self.sequence <= 0x7F:
            raise ValueError(f"retry token key sequence: must be 0..127, got {self.sequence}")
        object.__setattr__(self, "aead", AESGCM(self.key))

    @classmethod
    def from_secret(cls, secret: bytes, sequence: int = 0) -> TokenKey:
        """The key of a ``quiclb keygen`` file: the secret is the AES key, the IV is derived from it."""
        iv = hmac.new(secret, _IV_LABEL, hashlib.sha256).digest()[:TOKEN_NUMBER_LEN]
        return cls(secret, iv, sequence)

    def nonce(self, token_number: bytes) -> bytes:
        return bytes(a ^ b for a, b in zip(self.iv, token_number, strict=True))


def client_ip_bytes(ip: str) -> bytes:
    """The 128-bit client address of the associated data: IPv4 is followed by 12 zero octets."""
    packed = ipaddress.ip_address(ip).packed
    return packed + bytes(16 - len(packed))


def _associated_data(ip: str, first: int, token_number: bytes, rscid: bytes) -> bytes:
    return client_ip_bytes(ip) + bytes((first,)) + token_number + bytes((len(rscid),)) + rscid


def make_retry_token(
    key: TokenKey, client: Address, odcid: bytes, rscid: bytes, *, now: float, token_number: bytes
) -> bytes:
    """A Retry token for ``client``'s Initial with DCID ``odcid``, answered by a Retry with SCID ``rscid``."""
    if not MIN_ODCID_LEN <= len(odcid) <= MAX_ODCID_LEN:
        raise ValueError(f"original DCID: must be {MIN_ODCID_LEN}..{MAX_ODCID_LEN} bytes, got {len(odcid)}")
    if len(token_number) != TOKEN_NUMBER_LEN:
        raise ValueError(f"token number: must be {TOKEN_NUMBER_LEN} bytes, got {len(token_number)}")
    first = key.sequence  # type bit 0: a Retry token
    body = _BODY_HEAD.pack(int(now) + TOKEN_LIFETIME, len(odcid)) + odcid + struct.pack(">H", client[1])
    sealed = key.aead.encrypt(key.nonce(token_number), body, _associated_data(client[0], first, token_number, rscid))
    return bytes((first,)) + token_number + sealed


def open_retry_token(
    key: TokenKey, token: bytes, client: Address, dcid: bytes, *, now: float
) -> tuple[TokenResult, bytes | None]:
    """Check a token from ``client``'s Initial whose DCID is ``dcid``: (result, original DCID if valid).

    Every refusal costs at most one AEAD call, and the refusals that need no
    key (length, type, key sequence) cost none.
    """
    head = 1 + TOKEN_NUMBER_LEN
    if len(token) < head + _BODY_HEAD.size + MIN_ODCID_LEN + 2 + TAG_LEN:
        return TokenResult.MALFORMED, None
    first = token[0]
    if first != key.sequence:  # type bit set (NEW_TOKEN) or another key's sequence
        return TokenResult.UNKNOWN_KEY, None
    token_number = token[1:head]
    try:
        ad = _associated_data(client[0], first, token_number, dcid)
        body = key.aead.decrypt(key.nonce(token_number), token[head:], ad)
    except InvalidTag:
        return TokenResult.INVALID, None
    except ValueError:  # an address that is not an IP, a DCID over 255 bytes
        return TokenResult.MALFORMED, None
    expiry, odcil = _BODY_HEAD.unpack_from(body)
    if not MIN_ODCID_LEN <= odcil <= MAX_ODCID_LEN or len(body) < _BODY_HEAD.size + odcil + 2:
        return TokenResult.MALFORMED, None
    if expiry + CLOCK_SKEW < now:
        return TokenResult.EXPIRED, None
    end = _BODY_HEAD.size + odcil
    (port,) = struct.unpack_from(">H", body, end)
    if port != client[1]:
        return TokenResult.WRONG_ADDRESS, None
    return TokenResult.VALID, body[_BODY_HEAD.size : end]
