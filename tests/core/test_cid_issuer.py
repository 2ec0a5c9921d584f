"""R-3 / S-4: issued CIDs never repeat under one key; exhaustion is reported before any repeat."""

from __future__ import annotations

import itertools

import pytest

from lb import CidConfig, CidIssuer, decode_cid, decode_server_id
from lb.core.cid_issuer import NoncePermutation

KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")


def test_r3_one_million_cids_under_one_key_are_unique() -> None:
    cfg = CidConfig(1, 2, 14, KEY)  # single pass: the production default shape
    issuer = CidIssuer(cfg, b"\x00\x07")
    seen = {issuer.next_cid() for _ in range(1_000_000)}
    assert len(seen) == 1_000_000
    assert issuer.issued == 1_000_000 and not issuer.exhausted


def test_r3_four_pass_and_plaintext_issuers_are_unique_and_route() -> None:
    for cfg in (CidConfig(0, 3, 5, KEY), CidConfig(2, 3, 5)):
        issuer = CidIssuer(cfg, b"\x01\x02\x03")
        cids = [issuer.next_cid() for _ in range(50_000)]
        assert len(set(cids)) == len(cids)
        assert all(decode_server_id(cfg, c) == b"\x01\x02\x03" for c in cids[:2000])


def test_r3_tiny_nonce_space_reports_exhaustion_before_any_repeat() -> None:
    cfg = CidConfig(0, 2, 4, KEY)
    issuer = CidIssuer(cfg, b"\xab\xcd", max_cids=1000, warn_fraction=0.9)
    routable = []
    warned_at = None
    while not issuer.exhausted:
        if warned_at is None and issuer.nearly_exhausted:
            warned_at = issuer.issued
        routable.append(issuer.next_cid())
    assert len(routable) == 1000 == len(set(routable))
    assert warned_at == 900
    assert issuer.remaining == 0
    # From now on: self-describing 0b111 CIDs of the same length, never a routable repeat.
    after = [issuer.next_cid() for _ in range(10)]
    assert all(c[0] == 0xE0 | (cfg.cid_len - 1) and len(c) == cfg.cid_len for c in after)
    assert all(decode_server_id(cfg, c) is None for c in after)
    assert issuer.unroutable_issued == 10


@pytest.mark.parametrize(
    "cfg",
    [CidConfig(0, 2, 4), CidConfig(1, 2, 14, KEY), CidConfig(2, 3, 5, KEY)],
    ids=["plaintext", "single-pass", "four-pass"],
)
@pytest.mark.parametrize("nonce_bits", [2, 10, 14])
def test_r3_a_small_nonce_space_is_used_exactly_once_each_then_only_0b111(cfg: CidConfig, nonce_bits: int) -> None:
    # The only check that tells a permutation of a counter from random nonces: exhaust the space.
    # Every nonce of the space appears exactly once (random nonces repeat and miss some, by the
    # birthday bound: 2^14 draws from 2^14 values miss about a third), then the issuer switches to
    # self-describing 0b111 CIDs before anything could repeat (-21 §9.6).
    sid = bytes(range(1, cfg.server_id_len + 1))
    space = 1 << nonce_bits
    issuer = CidIssuer(cfg, sid, nonce_bits=nonce_bits)
    assert issuer.limit == space
    nonces = []
    while not issuer.exhausted:
        assert issuer.issued < space, "the issuer kept issuing past its nonce space"
        decoded = decode_cid(cfg, issuer.next_cid())
        assert decoded is not None and decoded[0] == sid
        nonces.append(int.from_bytes(decoded[1], "big"))
    assert sorted(nonces) == list(range(space))
    assert nonces != sorted(nonces) or space <= 4  # permuted, not the counter itself
    after = [issuer.next_cid() for _ in range(5)]
    assert all(c[0] >> 5 == 0b111 and len(c) == cfg.cid_len for c in after)
    assert all(decode_cid(cfg, c) is None for c in after)
    assert issuer.unroutable_issued == 5 and issuer.remaining == 0


def test_nonce_bits_must_split_into_equal_halves() -> None:
    for bad in (0, 3, 34):
        with pytest.raises(ValueError, match="nonce_bits"):
            CidIssuer(CidConfig(0, 2, 4), b"\x00\x01", nonce_bits=bad)


def test_nonce_permutation_is_a_bijection_on_a_full_small_space() -> None:
    # 4-byte nonces are the smallest legal; check bijectivity on a 2^16 slice by counting images.
    perm = NoncePermutation(4, bytes(16))
    images = {perm.apply(i) for i in range(1 << 16)}
    assert len(images) == 1 << 16


def test_s4_random_start_and_no_visible_counter_in_plaintext() -> None:
    cfg = CidConfig(0, 2, 6)  # plaintext: nonce on the wire
    a = CidIssuer(cfg, b"\x00\x01")
    b = CidIssuer(cfg, b"\x00\x01")
    na = [decode_cid(cfg, a.next_cid()) for _ in range(100)]
    nb = [decode_cid(cfg, b.next_cid()) for _ in range(100)]
    assert na[0] != nb[0]  # random start / per-issuer key
    nonces = [int.from_bytes(x[1], "big") for x in na if x]
    diffs = {(y - x) % (1 << 48) for x, y in itertools.pairwise(nonces)}
    assert len(diffs) > 90  # consecutive nonces are not a counter (T14)
