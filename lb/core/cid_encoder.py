"""Server side of the QUIC-LB codec: server ID + nonce -> connection ID (-21 §5.4, §6.1).

Layout: ``first octet || transform(server_id || nonce) || extra bytes``. The
first octet carries the config ID in its top 3 bits and, when the server
self-describes length, the CID length minus one in its low 5 bits (-21 §3).
It is never a cipher input (trap T19), and extra bytes are appended after the
transformed block (erratum E8).
"""

from __future__ import annotations

import secrets

from lb.core.cid_cipher import aes_ecb, feistel_encrypt, feistel_params
from lb.core.cid_config import UNROUTABLE_CONFIG_ID, CidConfig, CidMode
from lb.core.quic_constants import MAX_CID_LEN_V1

#: Low 5 bits of the first octet (-21 §3).
LOW_BITS_MASK = 0x1F
#: Shortest recommended 0b111 CID (-21 §3.2): the first octet and 7 random bytes.
MIN_UNROUTABLE_CID_LEN = 8


def first_octet(config_id: int, cid_len: int, self_encode_length: bool, low_bits: int | None = None) -> int:
    """``(config_id << 5) | low5``; low5 = length - 1 when self-describing, else the server's bits."""
    if self_encode_length:
        low5 = cid_len - 1
    elif low_bits is None:
        # Random free bits, so they have no relation to earlier CIDs (-21 §3.3).
        low5 = secrets.randbits(5)
    else:
        low5 = low_bits & LOW_BITS_MASK
    return (config_id << 5) | low5


def encode_block(cfg: CidConfig, plaintext: bytes) -> bytes:
    """Transform ``server_id || nonce`` (n bytes) per the configuration's mode."""
    mode = cfg.mode
    if mode is CidMode.PLAINTEXT:
        return plaintext
    assert cfg.key is not None
    encrypt = aes_ecb(cfg.key).encrypt
    if mode is CidMode.SINGLE_PASS:
        return encrypt(plaintext)
    return feistel_encrypt(encrypt, feistel_params(cfg.block_len), plaintext)


def encode_cid(
    cfg: CidConfig,
    server_id: bytes,
    nonce: bytes,
    *,
    extra: bytes = b"",
    low_bits: int | None = None,
) -> bytes:
    """Build one routable CID.

    ``extra`` bytes are appended unencrypted (every server of a configuration
    must use the same count, -21 §5.2). ``low_bits`` sets the free low 5 bits
    of the first octet when the configuration does not self-describe length;
    by default they are random.
    """
    if len(server_id) != cfg.server_id_len:
        raise ValueError(f"server_id: must be {cfg.server_id_len} bytes for this configuration, got {len(server_id)}")
    if len(nonce) != cfg.nonce_len:
        raise ValueError(f"nonce: must be {cfg.nonce_len} bytes for this configuration, got {len(nonce)}")
    total = cfg.cid_len + len(extra)
    if total > MAX_CID_LEN_V1:
        raise ValueError(f"extra: CID would be {total} bytes, QUIC v1 allows at most {MAX_CID_LEN_V1}")
    head = first_octet(cfg.config_id, total, cfg.self_encode_length, low_bits)
    return bytes((head,)) + encode_block(cfg, bytes(server_id) + bytes(nonce)) + bytes(extra)


def unroutable_cid(length: int = MIN_UNROUTABLE_CID_LEN) -> bytes:
    """A 0b111 CID for a server without a usable configuration (-21 §3.2).

    It always self-describes its length; the remaining bytes are random so they
    collide no more often than random bytes.
    """
    if not 2 <= length <= MAX_CID_LEN_V1:
        raise ValueError(f"length: must be 2..{MAX_CID_LEN_V1}, got {length}")
    return bytes(((UNROUTABLE_CONFIG_ID << 5) | (length - 1),)) + secrets.token_bytes(length - 1)
