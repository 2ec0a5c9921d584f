"""AES-128-ECB contexts and the four-pass Feistel network of QUIC-LB (-21 §5.4.2).

Shared by the encoder (servers) and the decoder (load balancers). Halves are
handled as Python ints of ``half_len`` bytes: XOR and nibble clearing are then
single integer operations, which is both clearer and faster than byte loops.

Every Feistel AES call is an *encryption*, in both directions (trap T8).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

AES_BLOCK_LEN = 16
#: Offset of the length byte and the pass byte in the AES input (-21 §5.4.2.2).
EXPAND_LEN_OFFSET = 14


class AesEcb:
    """One key's ECB encryptor and decryptor, reused for every call.

    Creating a cipher context costs far more than one block operation, so each
    key gets exactly one pair of contexts. ECB contexts are never finalized:
    ``update`` on whole blocks can be called forever.
    """

    __slots__ = ("decrypt", "encrypt")

    def __init__(self, key: bytes) -> None:
        cipher = Cipher(algorithms.AES(key), modes.ECB())  # noqa: S305 - ECB on single blocks is the draft's construction
        self.encrypt: Callable[[bytes], bytes] = cipher.encryptor().update
        self.decrypt: Callable[[bytes], bytes] = cipher.decryptor().update


@lru_cache(maxsize=1024)
def aes_ecb(key: bytes) -> AesEcb:
    """The shared contexts for ``key`` (bounded cache: configurations are few)."""
    return AesEcb(key)


class FeistelParams:
    """Per-configuration constants of the four-pass network, computed once.

    ``n`` is ``server_id_len + nonce_len`` (never the CID length, trap T2).
    """

    __slots__ = ("half_bits", "half_len", "left_mask", "n", "odd", "pad", "right_mask", "suffixes")

    def __init__(self, n: int) -> None:
        self.n = n
        self.half_len = (n + 1) // 2
        self.odd = n % 2 == 1
        self.half_bits = 8 * self.half_len
        full = (1 << self.half_bits) - 1
        # Odd n: both halves hold the middle byte; left keeps its high nibble,
        # right its low nibble (-21 §5.4.2.3 step 2).
        self.left_mask = full & ~0x0F if self.odd else full
        self.right_mask = full >> 4 if self.odd else full
        self.pad = AES_BLOCK_LEN - self.half_len
        # expand(): half || zeros || n || pass, for pass 1..4 (index 0 unused).
        self.suffixes = [b""] + [
            bytes(EXPAND_LEN_OFFSET - self.half_len) + bytes((n, p)) for p in range(1, 5)
        ]

    def split(self, block: bytes) -> tuple[int, int]:
        """split(): the first and last ``half_len`` bytes, nibbles cleared when n is odd."""
        h = self.half_len
        left = int.from_bytes(block[:h], "big") & self.left_mask
        right = int.from_bytes(block[self.n - h : self.n], "big") & self.right_mask
        return left, right

    def join(self, left: int, right: int) -> bytes:
        """join(): the inverse of split()."""
        h = self.half_len
        if not self.odd:
            return left.to_bytes(h, "big") + right.to_bytes(h, "big")
        # The middle byte is left's high nibble | right's low nibble; since the
        # halves were cleared, OR-ing the overlapping byte is exact.
        lb = left.to_bytes(h, "big")
        rb = right.to_bytes(h, "big")
        return lb[:-1] + bytes((lb[-1] | rb[0],)) + rb[1:]

    def expand(self, pass_no: int, half: int) -> bytes:
        """The 16-byte AES input for one pass (-21 §5.4.2.2)."""
        return half.to_bytes(self.half_len, "big") + self.suffixes[pass_no]

    def round_value(self, encrypt: Callable[[bytes], bytes], pass_no: int, half: int) -> int:
        """F(pass, half) = first half_len bytes of AES(expand(n, pass, half)) (trap T6)."""
        out = encrypt(self.expand(pass_no, half))
        return int.from_bytes(out[: self.half_len], "big")


@lru_cache(maxsize=32)
def feistel_params(n: int) -> FeistelParams:
    return FeistelParams(n)


def feistel_encrypt(encrypt: Callable[[bytes], bytes], params: FeistelParams, plaintext: bytes) -> bytes:
    """Four passes, clearing after every pass (trap T3), -21 §5.4.2.3."""
    lm, rm = params.left_mask, params.right_mask
    f = params.round_value
    left, right = params.split(plaintext)
    right = (right ^ f(encrypt, 1, left)) & rm
    left = (left ^ f(encrypt, 2, right)) & lm
    right = (right ^ f(encrypt, 3, left)) & rm
    left = (left ^ f(encrypt, 4, right)) & lm
    return params.join(left, right)


def feistel_cid_decryptor(
    encrypt: Callable[[bytes], bytes], params: FeistelParams, prefix_len: int
) -> Callable[[bytes], bytes]:
    """A function: CID -> the first ``prefix_len`` bytes of its decrypted block (-21 §5.5.2).

    The block is ``cid[1 : 1 + n]`` (the first octet is not encrypted). The passes
    are undone in the order 4, 3, 2, 1 (errata E4 and T5), clearing after each;
    pass 1 is skipped when the prefix lies wholly in left_0 (trap T11: a server
    ID no longer than the nonce costs three AES calls). ``prefix_len = n`` gives
    the full plaintext (server ID and nonce); the LB asks for the server ID only.

    This is the one scalar four-pass decryption. It is unrolled into a closure over
    local constants because on the LB it runs per decode-cache miss, where method
    calls and attribute lookups would cost as much as the AES calls themselves;
    the batch form (``cid_decoder``) must agree with it (property tests).
    """
    n, h = params.n, params.half_len
    lm, rm = params.left_mask, params.right_mask
    s1, s2, s3, s4 = params.suffixes[1:5]
    from_bytes = int.from_bytes
    join = params.join
    three_passes = 2 * prefix_len <= n

    def decrypt_prefix(cid: bytes) -> bytes:
        # split() inline: the halves' nibbles are cleared here too (trap T4).
        left = from_bytes(cid[1 : 1 + h], "big") & lm
        right = from_bytes(cid[1 + n - h : 1 + n], "big") & rm
        left = (left ^ from_bytes(encrypt(right.to_bytes(h, "big") + s4)[:h], "big")) & lm
        right = (right ^ from_bytes(encrypt(left.to_bytes(h, "big") + s3)[:h], "big")) & rm
        left = (left ^ from_bytes(encrypt(right.to_bytes(h, "big") + s2)[:h], "big")) & lm
        if three_passes:
            return left.to_bytes(h, "big")[:prefix_len]
        right = (right ^ from_bytes(encrypt(left.to_bytes(h, "big") + s1)[:h], "big")) & rm
        return join(left, right)[:prefix_len]

    return decrypt_prefix
