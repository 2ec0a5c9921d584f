"""R-1: every current-algorithm vector of draft -21 (App. B and the §5.4.2.4 worked example)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lb import CidConfig, decode_cid, decode_server_id, encode_cid
from lb.core.cid_cipher import aes_ecb, feistel_params
from lb.core.cid_decoder import CidDecoder

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent.parent / "vectors" / "vectors-draft21.json").read_text()
)
USABLE = [v for v in VECTORS if not v.get("malformed")]


def make_config(v: dict[str, Any]) -> CidConfig:
    c = v["config"]
    key = bytes.fromhex(c["key"]) if c["key"] else None
    return CidConfig(c["config_id"], c["server_id_len"], c["nonce_len"], key, c["len_self_encoded"])


def test_vector_file_is_the_expected_one() -> None:
    names = {v["name"] for v in VECTORS}
    assert {"B.1-1", "B.2-1", "B.2-2", "B.2-3", "B.2-4-as-published", "5.4.2.4-example"} <= names
    assert [v["name"] for v in VECTORS if v.get("malformed")] == ["B.1-2-as-published"]


@pytest.mark.parametrize("v", USABLE, ids=[v["name"] for v in USABLE])
def test_r1_encode_is_byte_exact(v: dict[str, Any]) -> None:
    cfg = make_config(v)
    assert encode_cid(cfg, bytes.fromhex(v["server_id"]), bytes.fromhex(v["nonce"])).hex() == v["cid"]


@pytest.mark.parametrize("v", USABLE, ids=[v["name"] for v in USABLE])
def test_r1_full_decode(v: dict[str, Any]) -> None:
    cfg = make_config(v)
    assert decode_cid(cfg, bytes.fromhex(v["cid"])) == (bytes.fromhex(v["server_id"]), bytes.fromhex(v["nonce"]))


@pytest.mark.parametrize("v", USABLE, ids=[v["name"] for v in USABLE])
def test_r1_lb_path_scalar_and_batch(v: dict[str, Any]) -> None:
    cfg = make_config(v)
    cid = bytes.fromhex(v["cid"])
    sid = bytes.fromhex(v["server_id"])
    assert decode_server_id(cfg, cid) == sid
    assert decode_server_id([cfg], cid) == sid
    dec = CidDecoder([cfg])
    assert dec.decode(cid) == sid
    assert dec.decode_many([cid, cid[:-1], cid]) == [sid, None, sid]


def test_r1_lb_passes_match_the_vector_notes() -> None:
    expected = {"B.1-1": 0, "B.2-1": 3, "B.2-2": 4, "B.2-3": 1, "B.2-4-as-published": 3, "5.4.2.4-example": 3}
    for v in USABLE:
        if v["name"] in expected:
            assert make_config(v).lb_passes == expected[v["name"]], v["name"]


def test_erratum_e1_published_row_is_unroutable_under_config_3() -> None:
    published = next(v for v in VECTORS if v["name"] == "B.2-4-as-published")
    corrected = next(v for v in VECTORS if v["name"] == "B.2-4-corrected-config-3")
    cid = bytes.fromhex(published["cid"])
    assert cid[0] >> 5 == 0  # 0x12: the bytes say config 0, whatever the draft's label says
    cfg3 = make_config(corrected)
    assert cfg3.config_id == 3
    assert decode_server_id(cfg3, cid) is None
    # Octets 1..18 are identical: the first octet is not a cipher input (T19).
    assert cid[1:] == bytes.fromhex(corrected["cid"])[1:]


def test_erratum_e2_malformed_row_is_not_parseable() -> None:
    bad = next(v for v in VECTORS if v.get("malformed"))
    assert len(bad["nonce"]) % 2 == 1  # 9 hex digits: 4.5 bytes


def test_worked_example_intermediates() -> None:
    v = next(v for v in VECTORS if v["name"] == "5.4.2.4-example")
    im = v["intermediates"]
    cfg = make_config(v)
    assert cfg.key is not None
    p = feistel_params(cfg.block_len)
    encrypt = aes_ecb(cfg.key).encrypt
    assert p.half_len == im["half_len"]
    left, right = p.split(bytes.fromhex(im["plaintext"]))
    h = p.half_len

    def hx(x: int) -> str:
        return x.to_bytes(h, "big").hex()

    assert (hx(left), hx(right)) == (im["left_0"], im["right_0"])
    # Pass by pass, with the AES inputs and outputs the draft prints (E3: step 10 reads b334357c).
    steps = [(1, "right"), (2, "left"), (3, "right"), (4, "left")]
    names = {1: "right_1", 2: "left_1", 3: "right_2", 4: "left_2"}
    for pass_no, side in steps:
        src = left if side == "right" else right
        aes_in = p.expand(pass_no, src)
        assert aes_in.hex() == im[f"aes_in_{pass_no}"]
        aes_out = encrypt(aes_in)
        assert aes_out.hex() == im[f"aes_out_{pass_no}"]
        f = int.from_bytes(aes_out[:h], "big")
        if side == "right":
            before = right ^ f
            right = before & p.right_mask
            assert hx(before) == im[f"{names[pass_no]}_before_clear"]
            assert hx(right) == im[names[pass_no]]
        else:
            before = left ^ f
            left = before & p.left_mask
            assert hx(before) == im[f"{names[pass_no]}_before_clear"]
            assert hx(left) == im[names[pass_no]]
    assert p.join(left, right).hex() == v["cid"][2:]


def test_function_examples() -> None:
    v = next(v for v in VECTORS if v["name"] == "5.4.2.4-example")
    fx = v["function_examples"]
    e = fx["expand"]
    p = feistel_params(e["length"])
    assert p.expand(e["pass"], int(e["input"], 16)).hex() == e["output"]
    t = fx["truncate"]
    assert bytes.fromhex(t["input"])[: t["n"]].hex() == t["output"]
    s = fx["split"]
    plain = bytes.fromhex(s["plaintext"])
    sp = feistel_params(len(plain))
    left, right = sp.split(plain)
    assert left.to_bytes(sp.half_len, "big").hex() == s["left_0"]
    assert right.to_bytes(sp.half_len, "big").hex() == s["right_0"]


@pytest.mark.parametrize(
    ("wrong", "body"),
    [
        ("T1 pre-19 expand layout", "8e9a91f4949762"),
        ("T2 CID length as n", "df1c86aab36775"),
        ("T3 clearing only at join", "5697b71fdf8581"),
        ("T6 truncating the tail", "04b45b7259031b"),
    ],
)
def test_known_wrong_bodies_are_not_produced(wrong: str, body: str) -> None:
    v = next(v for v in VECTORS if v["name"] == "5.4.2.4-example")
    assert encode_cid(make_config(v), bytes.fromhex(v["server_id"]), bytes.fromhex(v["nonce"]))[1:].hex() != body


def test_t7_sixteen_bytes_with_key_is_single_pass() -> None:
    v = next(v for v in VECTORS if v["name"] == "B.2-3")
    cid = encode_cid(make_config(v), bytes.fromhex(v["server_id"]), bytes.fromhex(v["nonce"]))
    assert cid[1:].hex() == "4dd2d05a7b0de9b2b9907afb5ecf8cc3"
    assert cid[1:].hex() != "582c81e40da9fd0635e7d2d183e2c810"  # Feistel on 16 bytes (wrong)
