"""Validated QUIC-LB configuration shared by load balancers and servers.

Limits are exactly those of draft-ietf-quic-load-balancers-21 §5.3 and §3.1,
no tighter: config ID 0..6 (7 is the reserved "no configuration" codepoint),
server ID length >= 1, nonce length >= 4, server ID + nonce <= 19 bytes (the
20-byte QUIC v1 CID limit minus the first octet), key absent or 16 bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from lb.core.quic_constants import MAX_CID_LEN_V1

#: Config rotation codepoint that no configuration may use (-21 §3.2).
UNROUTABLE_CONFIG_ID = 7
MAX_CONFIG_ID = 6
MIN_SERVER_ID_LEN = 1
MIN_NONCE_LEN = 4
MAX_BLOCK_LEN = MAX_CID_LEN_V1 - 1
AES_KEY_LEN = 16
AES_BLOCK_LEN = 16


class CidMode(enum.Enum):
    """How the server ID and nonce are transformed (-21 §5.4); a function of the config alone."""

    PLAINTEXT = "plaintext"
    SINGLE_PASS = "single-pass"
    FOUR_PASS = "four-pass"


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer {low}..{high}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name}: must be {low}..{high}, got {value}")


@dataclass(frozen=True, slots=True)
class CidConfig:
    """One QUIC-LB configuration (-21 §2).

    ``key`` is the 16-byte AES-128 key, or ``None`` for plaintext mode.
    ``self_encode_length`` makes the low 5 bits of the first octet carry the
    CID length minus one (-21 §3.3); otherwise they are random.
    """

    config_id: int
    server_id_len: int
    nonce_len: int
    key: bytes | None = field(default=None, repr=False)
    self_encode_length: bool = True

    def __post_init__(self) -> None:
        _check_int("config_id", self.config_id, 0, MAX_CONFIG_ID)
        _check_int("server_id_len", self.server_id_len, MIN_SERVER_ID_LEN,
                   MAX_BLOCK_LEN - MIN_NONCE_LEN)
        _check_int("nonce_len", self.nonce_len, MIN_NONCE_LEN, MAX_BLOCK_LEN - MIN_SERVER_ID_LEN)
        if self.server_id_len + self.nonce_len > MAX_BLOCK_LEN:
            raise ValueError(
                f"server_id_len + nonce_len: must be at most {MAX_BLOCK_LEN}, got "
                f"{self.server_id_len} + {self.nonce_len} = {self.server_id_len + self.nonce_len}"
            )
        if self.key is not None:
            if not isinstance(self.key, (bytes, bytearray)):
                raise ValueError(f"key: must be {AES_KEY_LEN} bytes or None, got {type(self.key).__name__}")
            if len(self.key) != AES_KEY_LEN:
                raise ValueError(f"key: must be exactly {AES_KEY_LEN} bytes (AES-128), got {len(self.key)}")
            object.__setattr__(self, "key", bytes(self.key))
        if not isinstance(self.self_encode_length, bool):
            raise ValueError(f"self_encode_length: must be a bool, got {self.self_encode_length!r}")

    @property
    def block_len(self) -> int:
        """``n = server_id_len + nonce_len``: the bytes after the first octet that carry data."""
        return self.server_id_len + self.nonce_len

    @property
    def cid_len(self) -> int:
        """Length of a CID of this configuration without extra bytes."""
        return 1 + self.block_len

    @property
    def mode(self) -> CidMode:
        if self.key is None:
            return CidMode.PLAINTEXT
        if self.block_len == AES_BLOCK_LEN:
            return CidMode.SINGLE_PASS
        return CidMode.FOUR_PASS

    @property
    def lb_passes(self) -> int:
        """AES calls an LB needs to recover the server ID (0, 1, 3 or 4; -21 §5.5.2)."""
        mode = self.mode
        if mode is CidMode.PLAINTEXT:
            return 0
        if mode is CidMode.SINGLE_PASS:
            return 1
        return 3 if 2 * self.server_id_len <= self.block_len else 4
