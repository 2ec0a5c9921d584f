"""Router.route_batch equals Router.route for any mix of datagrams, and decodes each batch's misses together.

The scalar :meth:`Router.route` is the reference (tests/core/test_router.py
checks it against the spec row by row, and runs the same rows through
``route_batch`` with batches of one). Here real batches, laid out in slots as
the recvmmsg adapter lays them out, must give the same decisions and the same
counters as routing each datagram in order, for any mix: routable, unknown and
removed server IDs, several live configurations, Initials, VN, unknown
versions, garbage, duplicates inside a batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import CidConfig, encode_cid
from lb.core.batch_routing import HIT_LOG_FOLD
from lb.core.cid_decoder import ConfigDecoder
from lb.core.outcomes import Outcome, RouterStats
from lb.core.router import Router
from lb.core.service_table import Backend, ServiceTable, build_service_table
from quiclb_harness.datagrams import initial, long_header, short_header, version_negotiation

K0 = bytes.fromhex("fdf726a9893ec05c0632d3956680baf0")
K1 = bytes.fromhex("8f95f09245765f80256934e50c66207f")
SINGLE = CidConfig(config_id=0, server_id_len=2, nonce_len=14, key=K0)
FOUR = CidConfig(config_id=1, server_id_len=3, nonce_len=4, key=K1)
PLAIN = CidConfig(config_id=2, server_id_len=2, nonce_len=6, key=None)
CONFIGS = (SINGLE, FOUR, PLAIN)
VIP = ("192.0.2.10", 443)
#: Server IDs 1..4 are backends (3 drains, 4 failed its health checks), 5 is tombstoned, 6 unassigned.
BACKENDS = [
    Backend((k).to_bytes(3, "big"), (f"10.0.0.{k}", 4000 + k), draining=k == 3, healthy=k != 4) for k in (1, 2, 3, 4)
]


def sid(k: int, cfg: CidConfig) -> bytes:
    return k.to_bytes(3, "big")[-cfg.server_id_len :]


def make_table(*, switch: bool) -> ServiceTable:
    """One four-pass configuration with 3-byte server IDs."""
    return build_service_table(
        name="svc", vip=VIP, cid_configs=[FOUR], backends=BACKENDS, fallback_key=bytes(32),
        tombstones=[(5).to_bytes(3, "big")], maglev_size=1009, short_header_fallback=switch,
    )


def make_multi_table(*, switch: bool) -> ServiceTable:
    """Three live configurations of one server-ID length (2 bytes): single pass, four pass, plaintext."""
    configs = (
        SINGLE,
        CidConfig(config_id=1, server_id_len=2, nonce_len=5, key=K1),
        PLAIN,
    )
    backends = [Backend(b.server_id[1:], b.address, draining=b.draining, healthy=b.healthy) for b in BACKENDS]
    return build_service_table(
        name="svc", vip=VIP, cid_configs=configs, backends=backends, fallback_key=bytes(32),
        tombstones=[(5).to_bytes(2, "big")], maglev_size=1009, short_header_fallback=switch,
    )


def cids_of(tbl: ServiceTable, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for cfg in tbl.cid_configs:
        for k in (1, 2, 3, 4, 5, 6):
            for _ in range(3):
                out.append(encode_cid(cfg, server_id=sid(k, cfg), nonce=rng.randbytes(cfg.nonce_len)))
    return out


def datagram_kinds(cids: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    cid = st.sampled_from(list(cids))
    return st.one_of(
        cid.map(lambda c: short_header(c, payload_len=20)),  # routable or not, repeated often
        st.tuples(cid, st.integers(0, 20)).map(lambda t: short_header(t[0], payload_len=20)[: 1 + t[1]]),
        st.binary(min_size=0, max_size=40),  # garbage, any first byte
        st.tuples(st.integers(0xE0, 0xFF), st.binary(min_size=20, max_size=30)).map(  # 0b111 config bits
            lambda t: bytes([0x40, t[0]]) + t[1]
        ),
        st.binary(min_size=8, max_size=20).map(lambda d: initial(0x00000001, d, b"\x01" * 8)),  # client Initial
        cid.map(lambda c: long_header(0x00000001, c, b"\x02" * 8, first_byte=0xE0, pad_to=60)),  # Handshake
        cid.map(lambda c: version_negotiation(c, b"", [1])),
        cid.map(lambda c: long_header(0x1A2A3A4A, c, b"", pad_to=1200)),  # unknown version, full size
        cid.map(lambda c: long_header(0x1A2A3A4A, c, b"", pad_to=100)),  # unknown version, small
    )


def slots(datagrams: Sequence[bytes]) -> tuple[bytes, int, list[int]]:
    """Lay datagrams out like recvmmsg does: fixed-size slots, garbage after each datagram."""
    stride = max((len(d) for d in datagrams), default=0) + 7
    buf = bytearray(b"\xa5" * (stride * len(datagrams)))
    for i, d in enumerate(datagrams):
        buf[i * stride : i * stride + len(d)] = d
    return bytes(buf), stride, [len(d) for d in datagrams]


def comparable(stats: RouterStats, *, with_cipher: bool) -> tuple[object, ...]:
    base = (stats.rx_client_datagrams, dict(stats.outcomes), stats.malformed, stats.cid_routed, stats.fallback_routed)
    return (*base, stats.cipher_calls) if with_cipher else base


def check_batch_equals_scalar(
    tbl: ServiceTable, datagrams: list[bytes], clients: list[tuple[str, int]], chunk: int, cache_size: int
) -> None:
    scalar, batch = Router(tbl, cache_size=cache_size), Router(tbl, cache_size=cache_size)
    expected = [scalar.route(d, c) for d, c in zip(datagrams, clients, strict=True)]
    got = []
    for start in range(0, len(datagrams), chunk):
        part = datagrams[start : start + chunk]
        buf, stride, lengths = slots(part)
        got += batch.route_batch(buf, stride, lengths, lambda i, s=start: clients[s + i])  # type: ignore[misc]
    assert got == expected
    # The cache's FIFO eviction may differ inside a batch when it is full; then only cipher calls differ.
    evicted = scalar.stats().cache_evictions > 0 or batch.stats().cache_evictions > 0
    assert comparable(batch.stats(), with_cipher=not evicted) == comparable(scalar.stats(), with_cipher=not evicted)
    assert batch.stats().total_outcomes() == len(datagrams)


TABLES = {
    "four": make_table(switch=False),
    "four+switch": make_table(switch=True),
    "multi": make_multi_table(switch=False),
    "multi+switch": make_multi_table(switch=True),
}


@pytest.mark.parametrize("kind", list(TABLES))
@settings(max_examples=60, deadline=None)
@given(data=st.data(), chunk=st.sampled_from([1, 2, 7, 64]), cache_size=st.sampled_from([0, 3, 65536]))
def test_batch_equals_scalar_for_any_mix(kind: str, data: st.DataObject, chunk: int, cache_size: int) -> None:
    tbl = TABLES[kind]
    datagrams = data.draw(st.lists(datagram_kinds(cids_of(tbl, 1)), min_size=0, max_size=150))
    clients = data.draw(
        st.lists(
            st.tuples(st.sampled_from(["198.51.100.7", "198.51.100.8", "2001:db8::9"]), st.integers(1, 65535)),
            min_size=len(datagrams), max_size=len(datagrams),
        )
    )
    check_batch_equals_scalar(tbl, datagrams, clients, chunk, cache_size)


@pytest.mark.parametrize("kind", list(TABLES))
def test_batch_equals_scalar_on_a_large_random_mix(kind: str) -> None:
    tbl = TABLES[kind]
    rng = random.Random(kind)
    cids = cids_of(tbl, 2)
    datagrams = []
    for _ in range(20_000):
        pick = rng.random()
        if pick < 0.7:
            datagrams.append(short_header(rng.choice(cids), payload_len=rng.randrange(0, 60)))
        elif pick < 0.8:
            datagrams.append(initial(0x00000001, rng.randbytes(rng.randrange(8, 21)), b"\x01" * 8))
        elif pick < 0.85:
            datagrams.append(long_header(0x00000001, rng.choice(cids), b"", first_byte=0xE0, pad_to=50))
        else:
            datagrams.append(rng.randbytes(rng.randrange(0, 50)))
    clients = [(f"198.51.100.{rng.randrange(256)}", rng.randrange(1, 65536)) for _ in datagrams]
    check_batch_equals_scalar(tbl, datagrams, clients, 64, 65536)


def test_misses_of_a_batch_are_decoded_with_one_decoder_call_per_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Design §7: all misses of a batch in one decode_many per configuration (one AES call per pass).
    tbl = make_multi_table(switch=False)
    calls: list[int] = []
    scalar_calls: list[bytes] = []
    real = ConfigDecoder.decode_many

    def counting(self: ConfigDecoder, cids: Sequence[bytes]) -> list[bytes | None]:
        calls.append(len(cids))
        return real(self, cids)

    monkeypatch.setattr(ConfigDecoder, "decode_many", counting)
    router = Router(tbl)
    for dec in tbl.decoder.by_config_id:
        if dec is not None:
            inner = dec.decode
            dec.decode = lambda c, inner=inner: scalar_calls.append(c) or inner(c)  # type: ignore[misc]
    rng = random.Random(3)
    cids = [encode_cid(cfg, server_id=sid(k, cfg), nonce=rng.randbytes(cfg.nonce_len))
            for cfg in tbl.cid_configs for k in (1, 2, 6) for _ in range(10)]
    rng.shuffle(cids)
    buf, stride, lengths = slots([short_header(c) for c in cids[:64]])
    decisions = router.route_batch(buf, stride, lengths, lambda i: ("198.51.100.7", 1000 + i))
    assert len(decisions) == 64
    assert len(calls) == len({c[0] >> 5 for c in cids[:64]}) == 3  # one per live configuration
    assert sum(calls) == 64
    assert scalar_calls == []
    # Second pass: every routable DCID is now cached; only unknown server IDs are decoded again.
    calls.clear()
    router.route_batch(buf, stride, lengths, lambda i: ("198.51.100.7", 1000 + i))
    unknown = sum(1 for c in cids[:64] if tbl.decoder.decode(c) not in tbl.backends)
    assert sum(calls) == unknown


def impostors(cached: bytes, cid_len: int) -> dict[str, tuple[bytes, int]]:
    """Slots whose bytes after the first octet are a cached DCID, but which are not that route.

    Each value is (slot bytes, datagram length): the length may end before the slot's bytes
    do, as when a short datagram lands in a slot that still holds an older, longer one.
    """
    return {
        "long header": (b"\xc0" + cached[1:], len(cached)),  # a version, not a DCID, follows
        "fixed bit clear": (b"\x01" + cached[1:], len(cached)),
        "first octet 0x80": (b"\x80" + cached[1:], len(cached)),
        "DCID cut short (stale slot)": (cached, cid_len),
        "one byte": (cached, 1),
        "empty": (cached, 0),
    }


@pytest.mark.parametrize("kind", list(TABLES))
def test_batches_of_cached_datagrams_route_together_and_impostors_are_not_fooled(kind: str) -> None:
    # Step 1 of lb/core/batch_routing.py: a batch whose every datagram is a cached short header is
    # routed without per-datagram Python. Any datagram that only *looks* cached (a cached DCID after
    # the wrong first octet, or one cut short in a slot that still holds the rest) must not ride along.
    tbl = TABLES[kind]
    rng = random.Random(kind)
    cids = [c for c in cids_of(tbl, 3) if tbl.decoder.decode(c) in tbl.backends]
    cached = [short_header(c, payload_len=rng.randrange(0, 30)) for c in cids]
    scalar, batch = Router(tbl), Router(tbl)
    for d in cached:  # warm both caches
        scalar.route(d, ("198.51.100.7", 1))
        buf, stride, lengths = slots([d])
        batch.route_batch(buf, stride, lengths, lambda i: ("198.51.100.7", 1))

    def route_both(items: list[tuple[bytes, int]]) -> None:
        stride = max(len(b) for b, _ in items) + 3
        buf = bytearray(stride * len(items))
        for i, (b, _) in enumerate(items):
            buf[i * stride : i * stride + len(b)] = b
        lengths = [n for _, n in items]
        expected = [scalar.route(b[:n], ("198.51.100.7", 2)) for b, n in items]
        got = batch.route_batch(bytes(buf), stride, lengths, lambda i: ("198.51.100.7", 2))
        assert got == expected
        assert comparable(batch.stats(), with_cipher=True) == comparable(scalar.stats(), with_cipher=True)

    hits_before = sum(batch._hits.values())
    one_config = [d for d in cached if d[1] >> 5 == cached[0][1] >> 5]
    route_both([(d, len(d)) for d in one_config[:40]])
    assert sum(batch._hits.values()) - hits_before == min(40, len(one_config))  # the all-hits path ran
    route_both([(d, len(d)) for d in cached[:40]])  # several configurations in one batch
    cid_len = tbl.cid_configs[0].cid_len
    for name, impostor in impostors(one_config[0], cid_len).items():
        items = [(d, len(d)) for d in one_config[1:20]]
        items.insert(rng.randrange(len(items) + 1), impostor)
        route_both(items)
        assert batch.stats().outcomes == scalar.stats().outcomes, name


@pytest.mark.parametrize("kind", list(TABLES))
def test_cold_batches_of_short_headers_equal_scalar(kind: str) -> None:
    # A cold cache (1M DCIDs in the benchmark): batches of short headers that mostly miss, of one
    # configuration or of several, with repeats inside a batch and unknown server IDs among them.
    tbl = TABLES[kind]
    rng = random.Random(f"cold {kind}")
    cids = cids_of(tbl, 4)
    by_config: dict[int, list[bytes]] = {}
    for c in cids:
        by_config.setdefault(c[0] >> 5, []).append(c)
    batches = []
    for _ in range(30):
        pool = rng.choice([cids, *by_config.values()])  # mixed configurations, or one
        fresh = [encode_cid(cfg, server_id=sid(rng.choice((1, 2, 3, 4, 5, 6)), cfg), nonce=rng.randbytes(cfg.nonce_len))
                 for cfg in tbl.cid_configs if cfg.config_id == pool[0][0] >> 5 or pool is cids]
        size = rng.randrange(2, 40)
        batch = [short_header(rng.choice(pool + fresh), payload_len=rng.randrange(0, 20)) for _ in range(size)]
        batches.append(batch)
    datagrams = [d for b in batches for d in b]
    clients = [("198.51.100.7", 1000 + i) for i in range(len(datagrams))]
    for cache_size in (65536, 8):
        scalar, batch_router = Router(tbl, cache_size=cache_size), Router(tbl, cache_size=cache_size)
        expected = [scalar.route(d, c) for d, c in zip(datagrams, clients, strict=True)]
        got: list[object] = []
        start = 0
        for b in batches:
            buf, stride, lengths = slots(b)
            got += batch_router.route_batch(buf, stride, lengths, lambda i, s=start: clients[s + i])  # type: ignore[misc]
            start += len(b)
        assert got == expected
        cipher = scalar.stats().cache_evictions == 0
        assert comparable(batch_router.stats(), with_cipher=cipher) == comparable(scalar.stats(), with_cipher=cipher)


def test_the_hit_log_of_whole_batches_stays_bounded_and_counts_every_hit() -> None:
    tbl = TABLES["four"]
    cids = [c for c in cids_of(tbl, 5) if tbl.decoder.decode(c) in tbl.backends]
    buf, stride, lengths = slots([short_header(cids[i % len(cids)]) for i in range(64)])
    router = Router(tbl)
    batches = 2 * HIT_LOG_FOLD // 64 + 3
    for _ in range(batches):
        router.route_batch(buf, stride, lengths, lambda i: ("198.51.100.7", 1))
        assert len(router._hit_log) <= HIT_LOG_FOLD + 64
    stats = router.stats()
    assert stats.outcomes[Outcome.CID_ROUTED] == sum(stats.cid_routed.values()) == 64 * batches


@pytest.mark.parametrize("kind", list(TABLES))
@pytest.mark.parametrize("cache_size", [65536, 40, 0])
def test_cold_batches_of_distinct_live_dcids_skip_the_per_datagram_step_and_equal_scalar(
    kind: str, cache_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The benchmark's cold cache (1M DCIDs): every DCID new, each to a live backend. Such a
    # batch is resolved as a whole (one decode, one cache update), and must leave exactly what the
    # scalar path leaves: decisions, every counter (cipher calls and evictions too), the cache itself.
    tbl = TABLES[kind]
    rng = random.Random(f"unique {kind}")
    cfg = tbl.cid_configs[0]
    live = [sid(k, cfg) for k in (1, 2, 3, 4)]

    def fresh() -> bytes:
        return encode_cid(cfg, server_id=rng.choice(live), nonce=rng.randbytes(cfg.nonce_len))

    warm = [fresh() for _ in range(20)]
    batches = [[short_header(fresh(), payload_len=rng.randrange(0, 20)) for _ in range(rng.randrange(7, 65))]
               for _ in range(12)]
    # Some batches start with DCIDs cached earlier (a cache that is partly warm; at the start, because
    # the scalar path may evict one by the batch's own misses before reaching it, which only changes
    # cipher calls: see check_batch_equals_scalar). A small cache has evicted some: misses again.
    for b in batches[::3]:
        b[:0] = [short_header(c) for c in rng.sample(warm, 5)]
    # And batches where a new DCID comes twice: the second is a hit on the scalar path, so not
    # distinct: these go to step 3 (the check below is told which).
    repeated = []
    for _ in range(3):
        b = [short_header(fresh()) for _ in range(rng.randrange(7, 65))]
        b.insert(1, b[0])  # right after: no miss between them can evict it first (small cache)
        repeated.append(b)
    datagrams = [short_header(c) for c in warm] + [d for b in batches + repeated for d in b]
    client = ("198.51.100.7", 1000)
    scalar, batch_router = Router(tbl, cache_size=cache_size), Router(tbl, cache_size=cache_size)
    expected = [scalar.route(d, client) for d in datagrams]
    got = [batch_router.route(short_header(c), client) for c in warm]

    def no_step_three(*args: object) -> None:
        raise AssertionError("a batch of distinct live DCIDs went through the per-datagram step 3")

    with monkeypatch.context() as patched:
        patched.setattr(Router, "_resolve_misses", no_step_three)
        for b in batches:
            buf, stride, lengths = slots(b)
            got += batch_router.route_batch(buf, stride, lengths, lambda i: client)
    for b in repeated:
        buf, stride, lengths = slots(b)
        got += batch_router.route_batch(buf, stride, lengths, lambda i: client)
    assert got == expected
    assert batch_router.stats() == scalar.stats()
    def cache(router: Router) -> list[tuple[bytes, int, str]]:
        return [(dcid, route.config_id, route.label) for dcid, route in router._cache.entries.items()]

    assert cache(batch_router) == cache(scalar)
