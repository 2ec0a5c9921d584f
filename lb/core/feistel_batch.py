"""Four-pass decryption of a whole batch of CIDs: one AES call per pass, no Python per CID (-21 §5.5.2).

Each half lives in the first ``half_len`` bytes of a 16-byte slot whose
remaining bytes are already the ``expand()`` suffix (zeros, n, pass). The
concatenated slots are the AES input of a pass as they are; XOR-ing the masked
AES output into the other half's slots (one big-int XOR for the whole batch)
leaves their suffix bytes intact, and changing the pass byte is one more XOR.

Bytes move between the CIDs and the slots by strided slice copies, one per
byte position of a half (at most 8), not one per CID: a cold cache (1M DCIDs)
sends every datagram through here. The scalar form is
:func:`lb.core.cid_cipher.feistel_cid_decryptor`; property tests hold the two equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

from lb.core.cid_cipher import AES_BLOCK_LEN, FeistelParams
from lb.core.strided_unpack import cut_records

#: Batches up to this size keep their masks (the datapath's hold at most 64).
MAX_CACHED_BATCH = 256


class _Masks:
    """The whole-batch constants of one (n, batch size): masks over every slot and the pass-byte flips."""

    __slots__ = ("flip_3_1", "flip_4_2", "keep_left", "keep_right", "left_slots", "out_left", "out_right",
                 "right_slots")

    def __init__(self, params: FeistelParams, count: int) -> None:
        n, h = params.n, params.half_len

        def repeat(slot: bytes) -> int:
            return int.from_bytes(slot * count, "big")

        rest = AES_BLOCK_LEN - h
        # Nibble clearing inside the half, all-ones elsewhere (keeps the suffix) ...
        self.keep_left = repeat(params.left_mask.to_bytes(h, "big") + b"\xff" * rest)
        self.keep_right = repeat(params.right_mask.to_bytes(h, "big") + b"\xff" * rest)
        # ... and "half only" for the AES outputs (truncated to the half, T6).
        self.out_left = repeat(params.left_mask.to_bytes(h, "big") + bytes(rest))
        self.out_right = repeat(params.right_mask.to_bytes(h, "big") + bytes(rest))
        # XOR that turns pass byte a into b in every slot.
        self.flip_4_2 = repeat(bytes(AES_BLOCK_LEN - 1) + bytes((4 ^ 2,)))
        self.flip_3_1 = repeat(bytes(AES_BLOCK_LEN - 1) + bytes((3 ^ 1,)))
        pad = bytes(AES_BLOCK_LEN - h - 2)
        # Slot templates: a zero half, then the suffix; left halves feed passes 3 then 1, right ones 4 then 2.
        self.left_slots = (bytes(h) + pad + bytes((n, 3))) * count
        self.right_slots = (bytes(h) + pad + bytes((n, 4))) * count


# One entry per (configuration, batch size): 8 four-pass configurations x batches of 1..64 fit, so
# a service with several of them does not evict and rebuild its masks batch after batch.
@lru_cache(maxsize=512)
def _masks(params: FeistelParams, count: int) -> _Masks:
    return _Masks(params, count)


def feistel_sids(
    encrypt: Callable[[bytes], bytes], params: FeistelParams, sid_len: int, cids: Sequence[bytes]
) -> list[bytes]:
    """The server IDs (first ``sid_len`` plaintext bytes) of ``cids``, each at least ``1 + n`` bytes long."""
    count = len(cids)
    if not count:
        return []
    n, h = params.n, params.half_len
    masks = _masks(params, count) if count <= MAX_CACHED_BATCH else _Masks(params, count)
    stride = 1 + n
    joined = b"".join(cids)
    if len(joined) != stride * count:  # some CID is longer: the bytes after the block are ignored (T12)
        joined = b"".join([c[:stride] for c in cids])
    left_in, right_in = bytearray(masks.left_slots), bytearray(masks.right_slots)
    for j in range(h):  # one strided copy per byte of a half, for the whole batch
        left_in[j::AES_BLOCK_LEN] = joined[1 + j :: stride]
        right_in[j::AES_BLOCK_LEN] = joined[1 + n - h + j :: stride]
    width = count * AES_BLOCK_LEN
    left = int.from_bytes(left_in, "big") & masks.keep_left
    right = int.from_bytes(right_in, "big") & masks.keep_right

    def f(half: int) -> int:
        return int.from_bytes(encrypt(half.to_bytes(width, "big")), "big")

    # Undone in the order 4, 3, 2, 1 (errata E4, T5), clearing after each pass (T3).
    left ^= f(right) & masks.out_left  # L1 = L2 ^ F(4, R2)
    right ^= masks.flip_4_2
    right ^= f(left) & masks.out_right  # R1 = R2 ^ F(3, L1)
    left ^= masks.flip_3_1
    left ^= f(right) & masks.out_left  # L0 = L1 ^ F(2, R1)
    lb = left.to_bytes(width, "big")
    if 2 * sid_len <= n:  # the server ID lies in L0: pass 1 is skipped (T11)
        return cut_records(lb, AES_BLOCK_LEN, sid_len, count)
    right ^= f(left) & masks.out_right  # R0 = R1 ^ F(1, L0)
    rb = right.to_bytes(width, "big")
    # join(): byte j of the plaintext, for every CID at once; an odd n shares the middle byte
    # (left's high nibble, right's low nibble: both halves were cleared, so OR is exact).
    plain = bytearray(count * sid_len)
    for j in range(sid_len):
        if params.odd and j == h - 1:
            middle = int.from_bytes(lb[j::AES_BLOCK_LEN], "big") | int.from_bytes(rb[0::AES_BLOCK_LEN], "big")
            plain[j::sid_len] = middle.to_bytes(count, "big")
        elif j < h:
            plain[j::sid_len] = lb[j::AES_BLOCK_LEN]
        else:
            plain[j::sid_len] = rb[j - h + params.odd :: AES_BLOCK_LEN]
    return cut_records(bytes(plain), sid_len, sid_len, count)
