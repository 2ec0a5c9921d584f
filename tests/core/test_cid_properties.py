"""R-2: hypothesis round trips over every legal configuration; illegal ones are rejected."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import CidConfig, CidMode, decode_cid, decode_server_id, encode_cid, unroutable_cid
from lb.core.cid_decoder import CidDecoder, ConfigDecoder
from lb.core.strided_unpack import MAX_CACHED_RECORDS


@st.composite
def configs(draw: st.DrawFn) -> CidConfig:
    sid_len = draw(st.integers(1, 15))
    nonce_len = draw(st.integers(4, 19 - sid_len))
    key = draw(st.one_of(st.none(), st.binary(min_size=16, max_size=16)))
    return CidConfig(draw(st.integers(0, 6)), sid_len, nonce_len, key, draw(st.booleans()))


@st.composite
def config_and_cid(draw: st.DrawFn) -> tuple[CidConfig, bytes, bytes, bytes]:
    cfg = draw(configs())
    sid = draw(st.binary(min_size=cfg.server_id_len, max_size=cfg.server_id_len))
    nonce = draw(st.binary(min_size=cfg.nonce_len, max_size=cfg.nonce_len))
    extra = draw(st.binary(max_size=20 - cfg.cid_len))
    return cfg, sid, nonce, extra


@settings(max_examples=1000, deadline=None)
@given(config_and_cid())
def test_r2_round_trip(case: tuple[CidConfig, bytes, bytes, bytes]) -> None:
    cfg, sid, nonce, extra = case
    cid = encode_cid(cfg, sid, nonce, extra=extra)
    assert len(cid) == 1 + cfg.server_id_len + cfg.nonce_len + len(extra)
    assert cid[0] >> 5 == cfg.config_id
    if cfg.self_encode_length:
        assert cid[0] & 0x1F == len(cid) - 1
    if extra:
        assert cid.endswith(extra)  # extra bytes are appended in clear (E8)
    assert decode_server_id(cfg, cid) == sid
    assert decode_cid(cfg, cid) == (sid, nonce)
    if cfg.mode is CidMode.PLAINTEXT:
        assert cid[1 : 1 + cfg.server_id_len] == sid
    # Too short is unroutable (T12), a wrong config ID is unroutable.
    assert decode_server_id(cfg, cid[: cfg.cid_len - 1]) is None
    other = CidConfig((cfg.config_id + 1) % 7, cfg.server_id_len, cfg.nonce_len, cfg.key)
    assert decode_server_id(other, cid) is None


@settings(max_examples=300, deadline=None)
@given(configs(), st.lists(st.binary(max_size=22), max_size=40), st.data())
def test_batch_equals_scalar(cfg: CidConfig, randoms: list[bytes], data: st.DataObject) -> None:
    # A mix of valid CIDs, random bytes forced onto this config, and garbage (T18: random DCIDs).
    cids = list(randoms)
    for r in randoms:
        if r:
            cids.append(bytes((cfg.config_id << 5 | (r[0] & 0x1F),)) + r[1:])
    for _ in range(data.draw(st.integers(0, 5))):
        sid = data.draw(st.binary(min_size=cfg.server_id_len, max_size=cfg.server_id_len))
        nonce = data.draw(st.binary(min_size=cfg.nonce_len, max_size=cfg.nonce_len))
        cids.append(encode_cid(cfg, sid, nonce))
    dec = CidDecoder([cfg])
    assert dec.decode_many(cids) == [dec.decode(c) for c in cids] == [decode_server_id(cfg, c) for c in cids]
    # The per-config batch decoder agrees too on CIDs that carry its config bits.
    mine = [c for c in cids if c and c[0] >> 5 == cfg.config_id]
    assert ConfigDecoder(cfg).decode_many(mine) == [decode_server_id(cfg, c) for c in mine]


@pytest.mark.parametrize("mode", list(CidMode))
@settings(max_examples=40, deadline=None)
@given(st.sampled_from([1, 7, 64, MAX_CACHED_RECORDS + 1]), st.integers(0, 4), st.randoms(use_true_random=False))
def test_batch_of_cids_all_long_enough_equals_scalar(
    mode: CidMode, count: int, extra: int, rng: random.Random
) -> None:
    # The datapath's batches: every CID long enough (random bytes after the config bits, T18), some
    # longer than the configuration's length; larger than the batches the struct cut is kept for too.
    sid_len = rng.randrange(1, 12)  # room for a nonce of 4 bytes or more, and for sid + nonce < 16
    nonce_len = 16 - sid_len if mode is CidMode.SINGLE_PASS else rng.randrange(4, 16 - sid_len)
    key = None if mode is CidMode.PLAINTEXT else rng.randbytes(16)
    cfg = CidConfig(rng.randrange(7), sid_len, nonce_len, key)
    assert cfg.mode is mode
    cids = [bytes((cfg.config_id << 5 | rng.randrange(32),)) + rng.randbytes(cfg.cid_len - 1 + rng.randrange(extra + 1))
            for _ in range(count)]
    assert ConfigDecoder(cfg).decode_many(cids) == [decode_server_id(cfg, c) for c in cids]


@settings(max_examples=200, deadline=None)
@given(st.lists(configs(), min_size=1, max_size=7, unique_by=lambda c: c.config_id), st.data())
def test_sequence_of_configs_picks_by_config_bits(cfgs: list[CidConfig], data: st.DataObject) -> None:
    cfg = data.draw(st.sampled_from(cfgs))
    sid = data.draw(st.binary(min_size=cfg.server_id_len, max_size=cfg.server_id_len))
    cid = encode_cid(cfg, sid, bytes(cfg.nonce_len))
    assert decode_server_id(cfgs, cid) == sid
    assert decode_server_id({c.config_id: c for c in cfgs}, cid) == sid
    assert CidDecoder(cfgs).decode(cid) == sid


@settings(max_examples=200, deadline=None)
@given(st.lists(configs(), min_size=1, max_size=6, unique_by=lambda c: c.config_id), st.binary(max_size=31))
def test_0b111_never_decodes(cfgs: list[CidConfig], tail: bytes) -> None:
    cid = bytes((0xE0 | (len(tail) & 0x1F),)) + tail
    assert decode_server_id(cfgs, cid) is None
    assert CidDecoder(cfgs).decode(cid) is None
    assert CidDecoder(cfgs).decode_many([cid]) == [None]


def test_t13_edge_cases() -> None:
    cfg = CidConfig(0, 3, 4, bytes(16))
    assert decode_server_id(cfg, b"") is None
    assert decode_server_id(cfg, b"\xff") is None
    assert decode_server_id(cfg, bytes.fromhex("e7") + bytes(7)) is None
    u = unroutable_cid(8)
    assert u[0] == 0xE7 and len(u) == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config_id": 7, "server_id_len": 3, "nonce_len": 4}, "config_id: must be 0..6, got 7"),
        ({"config_id": -1, "server_id_len": 3, "nonce_len": 4}, "config_id: must be 0..6"),
        ({"config_id": 0, "server_id_len": 0, "nonce_len": 4}, "server_id_len: must be 1..15, got 0"),
        ({"config_id": 0, "server_id_len": 16, "nonce_len": 4}, "server_id_len: must be 1..15"),
        ({"config_id": 0, "server_id_len": 3, "nonce_len": 3}, "nonce_len: must be 4..18, got 3"),
        ({"config_id": 0, "server_id_len": 10, "nonce_len": 10}, "server_id_len + nonce_len: must be at most 19"),
        ({"config_id": 0, "server_id_len": 3, "nonce_len": 4, "key": bytes(15)}, "key: must be exactly 16 bytes"),
        ({"config_id": 0, "server_id_len": 3, "nonce_len": 4, "key": bytes(32)}, "key: must be exactly 16 bytes"),
        ({"config_id": 0, "server_id_len": 3, "nonce_len": 4, "key": "00" * 16}, "key: must be 16 bytes or None"),
        ({"config_id": True, "server_id_len": 3, "nonce_len": 4}, "config_id: must be an integer"),
        ({"config_id": 0, "server_id_len": 3.0, "nonce_len": 4}, "server_id_len: must be an integer"),
    ],
)
def test_illegal_configs_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace(".", r"\.")):
        CidConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("sid_len", "nonce_len"), [(1, 18), (15, 4), (1, 4), (8, 8), (5, 4), (10, 9)])
def test_t16_draft_limits_are_not_tightened(sid_len: int, nonce_len: int) -> None:
    cfg = CidConfig(2, sid_len, nonce_len, bytes(range(16)))
    sid = bytes(range(1, sid_len + 1))
    assert decode_server_id(cfg, encode_cid(cfg, sid, bytes(nonce_len))) == sid


def test_mode_selection() -> None:
    assert CidConfig(0, 2, 14).mode is CidMode.PLAINTEXT
    assert CidConfig(0, 2, 14, bytes(16)).mode is CidMode.SINGLE_PASS
    assert CidConfig(0, 2, 13, bytes(16)).mode is CidMode.FOUR_PASS
    assert CidConfig(0, 5, 4, bytes(16)).lb_passes == 4  # T11: odd n, sid_len = half_len
    assert CidConfig(0, 4, 5, bytes(16)).lb_passes == 3


def test_key_is_not_in_repr() -> None:
    key = bytes.fromhex("fdf726a9893ec05c0632d3956680baf0")
    assert key.hex() not in repr(CidConfig(0, 3, 4, key))


def test_encode_rejects_wrong_lengths() -> None:
    cfg = CidConfig(0, 3, 4)
    with pytest.raises(ValueError, match="server_id: must be 3 bytes"):
        encode_cid(cfg, b"\x01\x02", bytes(4))
    with pytest.raises(ValueError, match="nonce: must be 4 bytes"):
        encode_cid(cfg, b"\x01\x02\x03", bytes(5))
    with pytest.raises(ValueError, match="extra: CID would be 21 bytes"):
        encode_cid(cfg, b"\x01\x02\x03", bytes(4), extra=bytes(13))


def test_free_low_bits_without_self_encoding() -> None:
    cfg = CidConfig(3, 3, 4, bytes(16), self_encode_length=False)
    lows = {encode_cid(cfg, b"abc", bytes(4))[0] & 0x1F for _ in range(200)}
    assert len(lows) > 10  # random free bits, not a constant
    assert encode_cid(cfg, b"abc", bytes(4), low_bits=5)[0] == (3 << 5) | 5


@pytest.mark.parametrize(
    ("sid_len", "nonce_len", "aes_calls"), [(3, 4, 3), (4, 4, 3), (5, 4, 4), (7, 4, 4), (2, 12, 3)]
)
def test_four_pass_decryption_skips_pass_1_when_the_server_id_lies_in_left_0(
    sid_len: int, nonce_len: int, aes_calls: int
) -> None:
    # Trap T11 (-21 §5.5.2): a server ID no longer than half the block needs passes 4, 3, 2 only.
    # The one scalar four-pass decryption (cid_cipher) is shared by decode_cid and the LB's decoder.
    from lb.core.cid_cipher import aes_ecb, feistel_cid_decryptor, feistel_params  # noqa: PLC0415
    from lb.core.feistel_batch import feistel_sids  # noqa: PLC0415

    cfg = CidConfig(0, sid_len, nonce_len, bytes(range(16)))
    assert cfg.mode is CidMode.FOUR_PASS
    sid, nonce = bytes(range(1, sid_len + 1)), bytes(range(0x40, 0x40 + nonce_len))
    cid = encode_cid(cfg, sid, nonce)
    calls = []

    def counting_encrypt(block: bytes) -> bytes:
        calls.append(block)
        return aes_ecb(bytes(range(16))).encrypt(block)

    assert feistel_cid_decryptor(counting_encrypt, feistel_params(cfg.block_len), sid_len)(cid) == sid
    assert len(calls) == aes_calls == cfg.lb_passes
    # The batch form makes as many AES calls, each over the whole batch.
    calls.clear()
    assert feistel_sids(counting_encrypt, feistel_params(cfg.block_len), sid_len, [cid] * 5) == [sid] * 5
    assert len(calls) == aes_calls and {len(c) for c in calls} == {5 * 16}
    assert ConfigDecoder(cfg).decode(cid) == sid
    assert decode_cid(cfg, cid) == (sid, nonce)
