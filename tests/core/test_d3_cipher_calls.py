"""D-3, counted at the cipher: datagrams failing the size, fixed-bit, config or length checks cost no AES.

The router's own ``cipher_calls`` counter only says what the router thinks it
did. Here every AES context the codec creates is wrapped (``Cipher`` in
``lb.core.cid_cipher``, the only place that makes them), so a decode the
router forgot to count - or one done on garbage before a cheap check - shows.
Both entry points run: :meth:`Router.route` and :meth:`Router.route_batch`, the
latter on recvmmsg-like strided batches (its vectorised short-header path)
and on batches of one.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher

import lb.core.cid_cipher as cid_cipher
from lb import CidConfig, encode_cid
from lb.core.cid_decoder import _config_decoder
from lb.core.outcomes import Outcome
from lb.core.router import Router
from lb.core.service_table import Backend, ServiceTable, build_service_table
from quiclb_harness.datagrams import initial, long_header, short_header, version_negotiation

K0 = bytes.fromhex("fdf726a9893ec05c0632d3956680baf0")
K1 = bytes.fromhex("8f95f09245765f80256934e50c66207f")
SINGLE = CidConfig(config_id=0, server_id_len=2, nonce_len=14, key=K0)  # 17-byte CIDs, one AES block
FOUR = CidConfig(config_id=1, server_id_len=3, nonce_len=4, key=K1)  # 8-byte CIDs, three or four passes
SINGLE_B = CidConfig(config_id=1, server_id_len=2, nonce_len=14, key=K1)
TABLES = {"single": [SINGLE], "four-pass": [FOUR], "rotation": [SINGLE, SINGLE_B]}
VIP = ("192.0.2.10", 443)
DATAGRAMS = 10_000
BATCH = 64


class _CountedContext:
    def __init__(self, update: Any, counts: Counter[str], kind: str) -> None:
        self._update, self._counts, self._kind = update, counts, kind

    def update(self, data: bytes) -> bytes:
        self._counts["calls"] += 1
        self._counts["blocks"] += len(data) // 16
        self._counts[self._kind] += 1
        return self._update(data)  # type: ignore[no-any-return]


@pytest.fixture
def aes_counts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Every AES call made through contexts created from now on: calls and 16-byte blocks."""
    counts: Counter[str] = Counter()

    class CountingCipher:
        def __init__(self, algorithm: Any, mode: Any) -> None:
            self._cipher = Cipher(algorithm, mode)

        def encryptor(self) -> _CountedContext:
            return _CountedContext(self._cipher.encryptor().update, counts, "encrypt")

        def decryptor(self) -> _CountedContext:
            return _CountedContext(self._cipher.decryptor().update, counts, "decrypt")

    def forget_contexts() -> None:  # cached contexts were made before the patch (or with it)
        cid_cipher.aes_ecb.cache_clear()
        _config_decoder.cache_clear()

    forget_contexts()
    monkeypatch.setattr(cid_cipher, "Cipher", CountingCipher)
    yield counts
    monkeypatch.undo()
    forget_contexts()


def make_table(kind: str) -> ServiceTable:
    n = TABLES[kind][0].server_id_len
    backends = [Backend(k.to_bytes(n, "big"), (f"10.0.0.{k}", 4000 + k)) for k in (1, 2, 3)]
    return build_service_table(name="svc", vip=VIP, cid_configs=TABLES[kind], backends=backends,
                               fallback_key=bytes(32), maglev_size=1009, short_header_fallback=kind == "single")


def garbage(rng: random.Random, tbl: ServiceTable) -> list[tuple[str, bytes]]:
    """Datagrams that must be rejected (or fallback-routed) before any decode, each labelled."""
    cfg = tbl.cid_configs[0]
    cid_len = cfg.cid_len
    dead = sorted(set(range(8)) - {c.config_id for c in tbl.cid_configs})
    real = [encode_cid(cfg, k.to_bytes(cfg.server_id_len, "big"), rng.randbytes(cfg.nonce_len)) for k in (1, 2, 9)]
    out: list[tuple[str, bytes]] = []
    while len(out) < DATAGRAMS:
        full = rng.choice(real) if rng.random() < 0.5 else bytes([rng.randrange(0x20)]) + rng.randbytes(cid_len)
        dead_cfg = bytes([rng.choice(dead) << 5 | rng.randrange(0x20)]) + rng.randbytes(19)
        out += [
            ("short fixed bit", bytes([rng.randrange(0x40)]) + full + rng.randbytes(20)),
            ("short too short", bytes([0x40 | rng.randrange(0x40)]) + full[: rng.randrange(cid_len)]),
            ("short config", bytes([0x40 | rng.randrange(0x40)]) + dead_cfg + rng.randbytes(10)),
            ("long config", initial(1, dead_cfg[: rng.randrange(8, 21)], b"\x01" * 8)),
            ("long too short", initial(1, full[: rng.randrange(1, cid_len)], b"\x01" * 8)),
            ("long fixed bit", long_header(1, full, b"\x01" * 8, first_byte=0x80 | rng.randrange(0x40), pad_to=1200)),
            ("long small unknown version", long_header(0x1A2A3A4A, full, b"", pad_to=rng.randrange(30, 1200))),
            ("long version 0", version_negotiation(full, b"\x01" * 8, [1] * rng.randrange(1, 300))),
            ("long cid too long", long_header(1, full + rng.randbytes(21 - cid_len + rng.randrange(10)), b"")),
        ]
    return out[:DATAGRAMS]


def route_all(entry: str, router: Router, datagrams: list[bytes], client: tuple[str, int]) -> list[Outcome]:
    if entry == "route":
        return [router.route(d, client)[0] for d in datagrams]
    size = BATCH if entry == "route_batch" else 1
    outcomes: list[Outcome] = []
    for start in range(0, len(datagrams), size):
        chunk = datagrams[start : start + size]
        stride = max(len(d) for d in chunk) + 3
        buf = bytearray(b"\xa5" * (stride * len(chunk)))  # recvmmsg slots: stale bytes after each datagram
        for i, d in enumerate(chunk):
            buf[i * stride : i * stride + len(d)] = d
        decisions = router.route_batch(bytes(buf), stride, [len(d) for d in chunk], lambda _: client)
        outcomes += [o for o, _ in decisions]
    return outcomes


@pytest.mark.parametrize("entry", ["route", "route_batch", "route_batch-of-one"])
@pytest.mark.parametrize("kind", list(TABLES))
def test_d3_garbage_makes_no_aes_call(kind: str, entry: str, aes_counts: Counter[str]) -> None:
    rng = random.Random(f"D-3 {kind}")
    tbl = make_table(kind)
    labelled = garbage(rng, tbl)
    router = Router(tbl)
    aes_counts.clear()  # encoding the test CIDs above used AES; routing starts from zero
    outcomes = route_all(entry, router, [d for _, d in labelled], ("198.51.100.7", 5555))
    decoded = {Outcome.CID_ROUTED, Outcome.FALLBACK_UNKNOWN_SID, Outcome.UNKNOWN_SID_DROPPED}
    assert not [label for (label, _), o in zip(labelled, outcomes, strict=True) if o in decoded]
    assert aes_counts["calls"] == 0, aes_counts
    assert router.stats().cipher_calls == 0 and router.stats().rx_client_datagrams == DATAGRAMS

    # The control: the same router's real decodes are seen by the wrapper, and agree with its counter.
    cfg = tbl.cid_configs[-1]
    routable = [short_header(encode_cid(cfg, (1).to_bytes(cfg.server_id_len, "big"), rng.randbytes(cfg.nonce_len)))
                for _ in range(BATCH)]
    aes_counts.clear()
    assert set(route_all(entry, router, routable, ("198.51.100.7", 5555))) == {Outcome.CID_ROUTED}
    assert aes_counts["calls"] > 0
    assert aes_counts["blocks"] == router.stats().cipher_calls == BATCH * cfg.lb_passes
