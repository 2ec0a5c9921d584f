"""Retry offload and stateless resets in the sans-IO core (issue 9; acceptance S-9, A-4, S-5).

Independent references: RFC 9001 Appendix A.4 (a Retry packet byte for byte),
aioquic's own Retry parser and integrity check, and the retry-offload draft's
token test vector (its AEAD construction; the vector's body layout is older
than the draft's text, see lb/core/retry_token.py).
"""

from __future__ import annotations

import random

import pytest
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.packet import get_retry_integrity_tag, pull_quic_header
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lb import CidConfig, encode_cid
from lb.core.lb_replies import FloodMeter, RetryPolicy
from lb.core.maglev import four_tuple_key
from lb.core.outcomes import Outcome
from lb.core.rate_limit import REPLIES_PER_SOURCE, SourceLimiter
from lb.core.retry_token import (
    MAX_TOKENS_PER_KEY,
    TOKEN_LIFETIME,
    TokenKey,
    TokenResult,
    make_retry_token,
    open_retry_token,
)
from lb.core.router import Router
from lb.core.service_table import Backend, build_service_table
from lb.core.stateless_packets import build_reset, build_retry, initial_token, reset_length, reset_token
from quiclb_harness.datagrams import initial, short_header

QUIC_V1, QUIC_V2 = 0x00000001, 0x6B3343CF
KEY = TokenKey.from_secret(bytes(range(16)))
OTHER_KEY = TokenKey.from_secret(bytes(range(1, 17)))
CLIENT = ("198.51.100.7", 50000)
ODCID = bytes.fromhex("8394c8f03e515708")
RSCID = bytes.fromhex("f067a5502a4262b5")
NOW = 1_700_000_000.0
CFG = CidConfig(config_id=0, server_id_len=2, nonce_len=6, key=bytes(range(32, 48)))
VIP = ("192.0.2.10", 443)


def token(**kw: object) -> bytes:
    args: dict[str, object] = {"now": NOW, "token_number": bytes(12)}
    args.update(kw)
    return make_retry_token(KEY, CLIENT, ODCID, RSCID, **args)  # type: ignore[arg-type]


# --- tokens (S-9) -------------------------------------------------------------------


def test_token_round_trip_gives_the_original_dcid() -> None:
    assert open_retry_token(KEY, token(), CLIENT, RSCID, now=NOW) == (TokenResult.VALID, ODCID)


@pytest.mark.parametrize(
    ("case", "result"),
    [
        ("other client IP", TokenResult.INVALID),
        ("other client port", TokenResult.WRONG_ADDRESS),
        ("other key", TokenResult.INVALID),
        ("other DCID (not the Retry SCID)", TokenResult.INVALID),
        ("expired", TokenResult.EXPIRED),
        ("one bit flipped", TokenResult.INVALID),
        ("truncated", TokenResult.MALFORMED),
        ("NEW_TOKEN type", TokenResult.UNKNOWN_KEY),
        ("other key sequence", TokenResult.UNKNOWN_KEY),
    ],
)
def test_token_refusals(case: str, result: TokenResult) -> None:
    tok, client, dcid, key, now = token(), CLIENT, RSCID, KEY, NOW
    if case == "other client IP":
        client = ("198.51.100.8", CLIENT[1])
    elif case == "other client port":
        client = (CLIENT[0], CLIENT[1] + 1)
    elif case == "other key":
        key = OTHER_KEY
    elif case.startswith("other DCID"):
        dcid = bytes(8)
    elif case == "expired":
        now = NOW + TOKEN_LIFETIME + 2.01
    elif case == "one bit flipped":
        tok = tok[:20] + bytes((tok[20] ^ 1,)) + tok[21:]
    elif case == "truncated":
        tok = tok[:30]
    elif case == "NEW_TOKEN type":
        tok = bytes((0x80,)) + tok[1:]
    else:
        tok = bytes((5,)) + tok[1:]
    assert open_retry_token(key, tok, client, dcid, now=now) == (result, None)


def test_token_tolerates_two_seconds_of_skew_and_no_more() -> None:
    expiry = int(NOW) + TOKEN_LIFETIME
    assert open_retry_token(KEY, token(), CLIENT, RSCID, now=expiry + 1.99)[0] is TokenResult.VALID
    assert open_retry_token(KEY, token(), CLIENT, RSCID, now=expiry + 2.01)[0] is TokenResult.EXPIRED


def test_ipv6_client_binds_all_128_bits() -> None:
    v6 = ("2001:db8::1", 443)
    tok = make_retry_token(KEY, v6, ODCID, RSCID, now=NOW, token_number=bytes(12))
    assert open_retry_token(KEY, tok, v6, RSCID, now=NOW)[0] is TokenResult.VALID
    assert open_retry_token(KEY, tok, ("2001:db8::2", 443), RSCID, now=NOW)[0] is TokenResult.INVALID


def test_draft_token_vector_aead_construction() -> None:
    """The draft's vector: nonce = IV xor token number, AES-128-GCM, its associated data."""
    key = TokenKey(bytes.fromhex("30313233343536373839303132333435"), bytes.fromhex("313233343536373839303132"))
    number = bytes.fromhex("59ef316b70575e793e1a8782")
    assert key.nonce(number).hex() == "68dd025f45616941072ab6b0"
    sealed = bytes.fromhex(
        "7d38b274aa4427c7a1557c3fa666945931defc65da387a83855196a7cb73caac1e28e5346fd76868de94f8b62294"
        "f91174fdd711543a32d5e959867f9c22"
    )
    ad = bytes.fromhex("7f00000100000000000000000000000059ef316b70575e793e1a878200")
    body = AESGCM(key.key).decrypt(key.nonce(number), sealed, ad)
    # The vector's (older) body layout: ODCIL, RSCIL, port, ODCID, RSCID, timestamp.
    assert body == bytes.fromhex(
        "12101a0a" "0c3817b544ca1c94313bba41757547eec937" "0301e770d24b3b13070dd5c2a9264307" "0000000060c7bf4d"
    )


def test_token_numbers_are_what_the_caller_draws() -> None:
    a = make_retry_token(KEY, CLIENT, ODCID, RSCID, now=NOW, token_number=bytes(12))
    b = make_retry_token(KEY, CLIENT, ODCID, RSCID, now=NOW, token_number=bytes(11) + b"\x01")
    assert a[1:13] != b[1:13] and a[13:] != b[13:]


# --- packets ------------------------------------------------------------------------


def test_retry_matches_rfc9001_appendix_a4() -> None:
    packet = build_retry(QUIC_V1, client_scid=b"", retry_scid=RSCID, odcid=ODCID, token=b"token", unused_bits=0xF)
    assert packet.hex() == "ff000000010008f067a5502a4262b5746f6b656e04a265ba2eff4d829058fb3f0f2496ba"


@pytest.mark.parametrize("version", [QUIC_V1, QUIC_V2])
def test_aioquic_accepts_our_retry(version: int) -> None:
    scid = bytes(range(8))
    packet = build_retry(version, client_scid=scid, retry_scid=RSCID, odcid=ODCID, token=token(), unused_bits=3)
    header = pull_quic_header(Buffer(data=packet), host_cid_length=8)
    assert header.packet_type.name == "RETRY"
    assert (header.destination_cid, header.source_cid, header.token) == (scid, RSCID, token())
    assert header.integrity_tag == get_retry_integrity_tag(packet[:-16], ODCID, version=version)


def test_initial_token_is_read_from_any_varint_length() -> None:
    for size in (0, 1, 63, 64, 300):
        tok = bytes(range(256)) * 2
        datagram = initial(QUIC_V1, ODCID, RSCID, token=tok[:size])
        assert initial_token(datagram, len(ODCID), len(RSCID)) == tok[:size]
    assert initial_token(initial(QUIC_V1, ODCID, RSCID)[:23], 8, 8) is None  # no token length
    assert initial_token(initial(QUIC_V1, ODCID, RSCID, token=bytes(300))[:200], 8, 8) is None  # cut token


def test_reset_is_shorter_than_its_trigger_and_ends_in_the_token() -> None:
    tok = reset_token(b"k" * 16, b"\x01\x02", bytes(8))
    for trigger in range(0, 1500):
        length = reset_length(trigger)
        if length is None:
            assert trigger <= 21
            continue
        packet = build_reset(tok, length, bytes(64))
        assert 21 <= len(packet) < trigger and packet[-16:] == tok and packet[0] & 0xC0 == 0x40


def test_reset_tokens_depend_on_the_issuing_server_id() -> None:
    """S-5: backend B computing a token for backend A's CID does not get A's token."""
    cid = bytes(8)
    assert reset_token(b"k" * 16, b"\x00\x01", cid) != reset_token(b"k" * 16, b"\x00\x02", cid)
    assert reset_token(b"k" * 16, b"\x00\x01", cid) != reset_token(b"j" * 16, b"\x00\x01", cid)


# --- limits ---------------------------------------------------------------------------


def test_source_limiter_allows_ten_per_second_per_source() -> None:
    limiter = SourceLimiter()
    allowed = [limiter.allow("192.0.2.1", 100.0 + i / 100) for i in range(50)]
    assert sum(allowed) == REPLIES_PER_SOURCE
    assert limiter.allow("192.0.2.2", 100.5)
    assert limiter.allow("192.0.2.1", 101.0)  # the next second


def test_source_limiter_table_is_bounded() -> None:
    limiter = SourceLimiter(max_sources=100)
    assert sum(limiter.allow(f"10.0.{i // 256}.{i % 256}", 5.0) for i in range(1000)) == 100


def test_flood_meter_switches_on_above_threshold_and_off_after_a_quiet_second() -> None:
    meter = FloodMeter()
    assert not any(meter.tokenless(10.0 + i / 1000, 5) for i in range(5))
    assert meter.tokenless(10.9, 5)  # the sixth in one second
    assert meter.tokenless(11.5, 5)  # the following second stays on
    assert not meter.tokenless(12.5, 5)  # one quiet second later


# --- the router -----------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def retry_router(mode: str = "always", threshold: int = 2000, clock: Clock | None = None) -> Router:
    backends = [Backend(bytes((0, k)), (f"10.0.0.{k}", 4000 + k)) for k in (1, 2, 3)]
    table = build_service_table(
        name="svc", vip=VIP, cid_configs=[CFG], backends=backends, fallback_key=bytes(32),
        tombstones=[b"\x00\x09"], maglev_size=1009, retry=RetryPolicy(mode, KEY, threshold, CFG),
        reset_key=b"r" * 16,
    )
    return Router(table, clock=clock or Clock())


@pytest.mark.parametrize("entry", ["route", "route_batch"])
def test_retry_then_token_reaches_the_backend_the_fallback_picks(entry: str) -> None:
    router = retry_router()
    rng = random.Random(1)
    for n in range(200):
        client = (f"198.51.{n // 250}.{n % 250 + 1}", 1024 + n)
        odcid, scid = rng.randbytes(8), rng.randbytes(8)
        first = initial(QUIC_V1, odcid, scid)

        def route(datagram: bytes, client: tuple[str, int] = client) -> tuple[Outcome, Backend | None]:
            if entry == "route":
                return router.route(datagram, client)
            return router.route_batch(datagram, 0, [len(datagram)], lambda _: client)[0]

        assert route(first) == (Outcome.RETRY_SENT, None)
        [(packet, to)] = router.replies.take()
        assert to == client and len(packet) <= 0.15 * len(first)
        header = pull_quic_header(Buffer(data=packet), host_cid_length=8)
        assert header.destination_cid == scid
        expected = router.table.maglev.lookup(four_tuple_key(client, VIP))
        assert header.source_cid[0] >> 5 == 0b111  # unroutable: the retried Initial takes the fallback
        second = initial(QUIC_V1, header.source_cid, scid, token=header.token)
        outcome, backend = route(second)
        assert outcome is Outcome.FALLBACK_INITIAL and backend is not None and backend.server_id == expected
        # The client's later Initials carry the token but the backend's CID: they go through unchecked.
        later = initial(QUIC_V1, encode_cid(CFG, expected, rng.randbytes(6)), scid, token=header.token)
        outcome, backend = route(later)
        assert outcome is Outcome.CID_ROUTED and backend is not None and backend.server_id == expected
        assert route(second, (client[0], client[1] + 1)) == (Outcome.TOKEN_REJECTED, None)  # replay, new port
        assert route(second, ("203.0.113.9", client[1])) == (Outcome.TOKEN_REJECTED, None)  # replay, new IP
    stats = router.stats()
    assert stats.lb_originated == {"retry": 200, "reset": 0}
    assert stats.retry_tokens == {"valid": 200, "wrong_address": 200, "invalid": 200}
    assert stats.total_outcomes() == stats.rx_client_datagrams == 1000


def test_expired_and_foreign_key_tokens_are_dropped() -> None:
    clock = Clock()
    router = retry_router(clock=clock)
    router.route(initial(QUIC_V1, ODCID, bytes(8)), CLIENT)
    [(packet, _)] = router.replies.take()
    header = pull_quic_header(Buffer(data=packet), host_cid_length=8)
    clock.now += TOKEN_LIFETIME + 3
    assert router.route(initial(QUIC_V1, header.source_cid, bytes(8), token=header.token), CLIENT)[0] is (
        Outcome.TOKEN_REJECTED
    )
    forged = make_retry_token(OTHER_KEY, CLIENT, ODCID, header.source_cid, now=clock.now, token_number=bytes(12))
    assert router.route(initial(QUIC_V1, header.source_cid, bytes(8), token=forged), CLIENT)[0] is (
        Outcome.TOKEN_REJECTED
    )
    assert router.stats().retry_tokens == {"expired": 1, "invalid": 1}


def test_retries_and_resets_are_rate_limited_per_source() -> None:
    clock = Clock()
    router = retry_router(clock=clock)
    outcomes = [router.route(initial(QUIC_V1, bytes([0x3C, n]) + bytes(6), bytes(8)), CLIENT)[0] for n in range(15)]
    assert outcomes.count(Outcome.RETRY_SENT) == REPLIES_PER_SOURCE
    assert outcomes.count(Outcome.RETRY_RATE_LIMITED) == 5
    removed = encode_cid(CFG, b"\x00\x09", bytes(6))
    assert router.route(short_header(removed), CLIENT)[0] is Outcome.REMOVED_BACKEND_DROPPED  # same source
    clock.now += 1
    assert router.route(short_header(removed), CLIENT)[0] is Outcome.RESET_SENT
    stats = router.stats()
    assert stats.lb_originated_rate_limited == {"retry": 5, "reset": 1}
    [*_, (reset, _)] = router.replies.take()
    assert reset[-16:] == reset_token(b"r" * 16, b"\x00\x09", removed)


def test_flood_mode_forwards_until_the_threshold() -> None:
    router = retry_router("flood", threshold=5)
    outcomes = [router.route(initial(QUIC_V1, bytes([0x3C, n]) + bytes(6), bytes(8)), (f"10.1.0.{n}", 9))[0]
                for n in range(8)]
    assert outcomes == [Outcome.FALLBACK_INITIAL] * 5 + [Outcome.RETRY_SENT] * 3


def test_no_reset_for_live_backends() -> None:
    router = retry_router()
    rng = random.Random(7)
    for _ in range(2000):
        live = encode_cid(CFG, bytes((0, rng.choice((1, 2, 3)))), rng.randbytes(6))
        assert router.route(short_header(live, payload_len=rng.randrange(0, 60)), CLIENT)[0] is Outcome.CID_ROUTED
    assert router.replies.take() == []


def test_token_budget_per_key() -> None:
    router = retry_router()
    router.replies._minted[KEY.key] = MAX_TOKENS_PER_KEY  # as if 2^23 tokens had been minted
    assert router.route(initial(QUIC_V1, ODCID, bytes(8)), CLIENT)[0] is Outcome.RETRY_RATE_LIMITED


def test_a_router_without_a_clock_refuses_to_build_retries() -> None:
    """lb.core reads no clock: the adapter passes one (lb.adapters.service_ports); forgetting it is loud."""
    table = retry_router().table
    with pytest.raises(RuntimeError, match="clock"):
        Router(table).route(initial(QUIC_V1, ODCID, bytes(8)), CLIENT)
