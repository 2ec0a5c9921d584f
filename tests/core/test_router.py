"""Router: a Katran-style outcome table built from the spec, plus invariants (F-1, F-4, D-2, D-3).

Sources: design.md §3 (decision order), acceptance.md §2.3 F-1/F-2/F-4, D-2,
D-3, A-2, A-3, §3 design implication 4 (outcome/counter table), §4 counters,
spec/quic-lb.md §6.2 (server ID extraction) and §7.1 (unroutable DCIDs).

Every row of :data:`ROWS` is ``(description, datagram, table, outcome,
backend, counter deltas)``. The counter deltas are checked exactly: a row
lists every counter that must move, and every other counter must stay still.
Each fallback row uses tables in which exactly one backend (``A``) is
eligible for the fallback, so the expected backend follows from the spec
alone, without recomputing the Maglev hash.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import CidConfig, CidIssuer, decode_server_id, encode_cid
from lb.core.encapsulation import encode_proxy_header
from lb.core.lb_replies import RetryPolicy
from lb.core.outcomes import Outcome
from lb.core.retry_token import TokenKey
from lb.core.router import Router
from lb.core.service_table import Backend, ServiceTable, build_service_table
from quiclb_harness.datagrams import initial, long_header, short_header, version_negotiation, vn_probe

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF
UNKNOWN_VERSION = 0xFF00ABCD

K0 = bytes.fromhex("fdf726a9893ec05c0632d3956680baf0")
K1 = bytes.fromhex("8f95f09245765f80256934e50c66207f")
FALLBACK_KEY = bytes(range(32))
MAGLEV_SIZE = 1009  # prime and >= 100 x backends for every table here

VIP = ("192.0.2.10", 443)
CLIENT = ("198.51.100.7", 50000)
SCID8 = bytes(range(0xA0, 0xA8))

# Backend roles by index: A takes new flows, B drains, C failed its health checks,
# T was removed (tombstone), U was never assigned.
A, B, C, T, U = 1, 2, 3, 4, 9

# --- configurations, one per mode (spec §5.1) ---------------------------------

CONFIGS: dict[str, CidConfig] = {
    "plain": CidConfig(config_id=0, server_id_len=1, nonce_len=8, key=None),  # 0 AES calls
    "single": CidConfig(config_id=0, server_id_len=1, nonce_len=15, key=K0),  # n = 16: 1 call
    "four3": CidConfig(config_id=0, server_id_len=1, nonce_len=8, key=K0),  # n = 9, nonce >= sid: 3
    "four3_even": CidConfig(config_id=0, server_id_len=2, nonce_len=8, key=K0),  # n = 10: 3
    "four4": CidConfig(config_id=0, server_id_len=5, nonce_len=4, key=K0),  # n = 9, sid > nonce: 4
    "four4_even": CidConfig(config_id=0, server_id_len=8, nonce_len=4, key=K0),  # n = 12: 4
}
#: AES calls an LB needs per decode (spec §0: four-pass takes 3 when nonce_len >= sid_len, else 4).
PASSES = {"plain": 0, "single": 1, "four3": 3, "four3_even": 3, "four4": 4, "four4_even": 4}
#: A second live configuration for rotation tests (config bits 1, four-pass, another key).
ROT1 = CidConfig(config_id=1, server_id_len=1, nonce_len=10, key=K1)


def sid(k: int, sid_len: int = 1) -> bytes:
    return bytes([k]) * sid_len


def backend_address(k: int) -> tuple[str, int]:
    return (f"10.0.0.{k}", 4000 + k)


def role_backend(k: int, sid_len: int = 1) -> Backend:
    return Backend(sid(k, sid_len), backend_address(k), draining=k == B, healthy=k != C)


def make_table(
    configs: Iterable[CidConfig],
    backends: Iterable[Backend],
    *,
    tombstones: Iterable[bytes] = (),
    short_header_fallback: bool = False,
    vip: tuple[str, int] = VIP,
    supported_versions: Iterable[int] = (QUIC_V1, QUIC_V2),
    name: str = "svc",
    retry: RetryPolicy | None = None,
    reset_key: bytes | None = None,
) -> ServiceTable:
    return build_service_table(
        name=name,
        vip=vip,
        cid_configs=configs,
        backends=backends,
        fallback_key=FALLBACK_KEY,
        tombstones=tombstones,
        maglev_size=MAGLEV_SIZE,
        supported_versions=supported_versions,
        short_header_fallback=short_header_fallback,
        retry=retry,
        reset_key=reset_key,
    )


RETRY_KEY = TokenKey.from_secret(bytes(range(16)))
RESET_KEY = bytes(range(100, 116))


@functools.cache
def table(kind: str) -> ServiceTable:
    """Named tables for the outcome table. Only ``A`` is ever fallback-eligible."""
    mode = kind.split("+", maxsplit=1)[0]
    switch = "+switch" in kind
    if mode in CONFIGS:
        cfg = CONFIGS[mode]
        n = cfg.server_id_len
        return make_table(
            [cfg], [role_backend(k, n) for k in (A, B, C)], tombstones=[sid(T, n)], short_header_fallback=switch
        )
    if mode == "rotation":
        return make_table([CONFIGS["single"], ROT1], [role_backend(k) for k in (A, B, C)], tombstones=[sid(T)])
    if mode == "drained":  # nothing takes new flows: B drains, C is down
        return make_table(
            [CONFIGS["single"]], [role_backend(k) for k in (B, C)], tombstones=[sid(T)], short_header_fallback=switch
        )
    if mode == "empty":
        return make_table([CONFIGS["single"]], [], short_header_fallback=switch)
    if mode == "retry":  # retry = "always", reset key set
        cfg = CONFIGS["single"]
        policy = RetryPolicy("always", RETRY_KEY, 2000, cfg)
        return make_table([cfg], [role_backend(k) for k in (A, B, C)], tombstones=[sid(T)], retry=policy,
                          reset_key=RESET_KEY)
    if mode == "v1only":
        return make_table([CONFIGS["single"]], [role_backend(k) for k in (A, B, C)], supported_versions=[QUIC_V1])
    raise KeyError(kind)


def nonce(cfg: CidConfig, seed: int = 0) -> bytes:
    return bytes((i * 37 + seed * 101 + 5) & 0xFF for i in range(cfg.nonce_len))


def cid(mode: str, k: int, seed: int = 0, *, cfg: CidConfig | None = None, extra: bytes = b"") -> bytes:
    cfg = cfg or CONFIGS[mode]
    return encode_cid(cfg, sid(k, cfg.server_id_len), nonce(cfg, seed), extra=extra)


# --- counters -------------------------------------------------------------------


def snapshot(router: Router) -> Counter[str]:
    """Every counter of the router, flattened to ``name[:label...]`` -> value."""
    s = router.stats()
    out: Counter[str] = Counter()
    out["rx"] = s.rx_client_datagrams
    for outcome, value in s.outcomes.items():
        out[outcome.name.lower()] = value
    for reason, value in s.malformed.items():
        out[f"malformed:{reason}"] = value
    for (config_id, label), value in s.cid_routed.items():
        out[f"cid_routed:{config_id}:{label}"] = value
    out["cipher_calls"] = s.cipher_calls
    return out


def deltas(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before.keys() | after.keys() if after[k] != before[k]}


def assert_counters_consistent(router: Router) -> None:
    s = router.stats()
    assert s.total_outcomes() == s.rx_client_datagrams
    assert sum(s.malformed.values()) == s.outcomes[Outcome.MALFORMED_DROPPED]
    assert sum(s.cid_routed.values()) == s.outcomes[Outcome.CID_ROUTED]


# --- the outcome table ----------------------------------------------------------


@dataclass(frozen=True)
class Row:
    desc: str
    datagram: bytes
    table: str
    outcome: Outcome
    backend: int | None  # role index, or None for a drop
    extra: dict[str, int] = field(default_factory=dict)  # deltas besides rx and the outcome counter

    def expected_deltas(self) -> dict[str, int]:
        return {"rx": 1, self.outcome.name.lower(): 1, **self.extra}


def routed(desc: str, datagram: bytes, tbl: str, k: int, *, config_id: int = 0, passes: int | None = None) -> Row:
    mode = tbl.split("+", maxsplit=1)[0]
    calls = PASSES.get(mode, 1) if passes is None else passes
    sid_len = CONFIGS[mode].server_id_len if mode in CONFIGS else 1
    extra = {f"cid_routed:{config_id}:{sid(k, sid_len).hex()}": 1}
    if calls:
        extra["cipher_calls"] = calls
    return Row(desc, datagram, tbl, Outcome.CID_ROUTED, k, extra)


def fallback(desc: str, datagram: bytes, tbl: str, outcome: Outcome, *, passes: int = 0) -> Row:
    return Row(desc, datagram, tbl, outcome, A, {"cipher_calls": passes} if passes else {})


def dropped(desc: str, datagram: bytes, tbl: str, outcome: Outcome, *, passes: int = 0) -> Row:
    return Row(desc, datagram, tbl, outcome, None, {"cipher_calls": passes} if passes else {})


def malformed(desc: str, datagram: bytes, reason: str, tbl: str = "single") -> Row:
    return Row(desc, datagram, tbl, Outcome.MALFORMED_DROPPED, None, {f"malformed:{reason}": 1})


def sized(datagram: bytes, size: int) -> bytes:
    assert len(datagram) == size, (len(datagram), size)
    return datagram


# DCIDs a client might choose. Config bits 1 (0x3c >> 5) name no configuration in
# the single-config tables; config bits 0 with 8 bytes are too short for a 17-byte CID.
CLIENT_DCID = bytes([0x3C, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77])
SHORT_CFG0_DCID = bytes([0x07, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77])
DCID_0B111 = bytes([0xE0 | 16]) + bytes(range(1, 17))  # self-describing 0b111, 17 bytes (spec §3.2)
DCID_CFG2 = bytes([0x40 | 16]) + bytes(range(1, 17))  # config bits 2: not live anywhere here
DCID21_CFG1 = bytes([0x3C]) + bytes(range(20))  # 21 bytes, config bits 1: never decoded here

S = "single"
CID_A, CID_B, CID_C = cid(S, A), cid(S, B), cid(S, C)
CID_T, CID_U = cid(S, T), cid(S, U)

ROWS: list[Row] = [
    # -- cheap rejects: malformed (design §3 step 1) ------------------------------
    malformed("empty datagram", b"", "empty"),
    malformed("1-byte short header", b"\x40", "truncated"),
    malformed("1-byte short header 0x7f", b"\x7f", "truncated"),
    malformed("1-byte long header", b"\xc0", "truncated"),
    malformed("short header fixed bit 0", short_header(CID_U, first_byte=0x01), "fixed_bit"),
    malformed("short header fixed bit 0 with a routable CID", short_header(CID_A, first_byte=0x00), "fixed_bit"),
    malformed("1-byte short header fixed bit 0", b"\x00", "fixed_bit"),
    malformed("client bytes that look like a PROXY v2 header", encode_proxy_header(CLIENT, VIP) + CID_A, "fixed_bit"),
    malformed("v1 long header fixed bit 0", long_header(QUIC_V1, CID_A, SCID8, first_byte=0x80, pad_to=1200),
              "fixed_bit"),
    malformed("v2 long header fixed bit 0", long_header(QUIC_V2, CID_A, SCID8, first_byte=0x90, pad_to=1200),
              "fixed_bit"),
    malformed("long header cut in the version", b"\xc0\x00\x00\x00", "truncated"),
    malformed("long header cut before the DCID length", b"\xc0\x00\x00\x00\x01", "truncated"),
    malformed("long header cut in the DCID", initial(QUIC_V1, CID_A, SCID8)[:12], "truncated"),
    malformed("long header cut before the SCID length", initial(QUIC_V1, CID_A, SCID8)[:6 + len(CID_A)], "truncated"),
    malformed("long header cut in the SCID", initial(QUIC_V1, CID_A, SCID8)[:6 + len(CID_A) + 4], "truncated"),
    malformed("unknown version cut in a DCID of 255", long_header(UNKNOWN_VERSION, bytes(255), b"")[:200],
              "truncated"),
    malformed("v1 DCID of 21 bytes", long_header(QUIC_V1, bytes(21), SCID8, pad_to=1200), "cid_too_long"),
    malformed("v1 DCID of 21 bytes starting with a routable CID", long_header(
        QUIC_V1, CID_A + b"\x00\x00\x00\x00", SCID8, pad_to=1200), "cid_too_long"),
    malformed("v1 DCID of 255 bytes", long_header(QUIC_V1, bytes(255), SCID8, pad_to=1500), "cid_too_long"),
    malformed("v1 SCID of 21 bytes", long_header(QUIC_V1, CID_A, bytes(21), pad_to=1200), "cid_too_long"),
    malformed("v2 DCID of 21 bytes", long_header(QUIC_V2, bytes(21), SCID8, packet_type=1, pad_to=1200),
              "cid_too_long"),
    # -- Version Negotiation from outside: version 0, any size (A-3) ------------------
    dropped("inbound VN, 7 bytes", b"\xc0" + bytes(4) + b"\x00\x00", S, Outcome.VN_DROPPED),
    dropped("inbound VN, small", version_negotiation(CLIENT_DCID, SCID8, [QUIC_V1]), S, Outcome.VN_DROPPED),
    dropped("inbound VN, 1200+ bytes", version_negotiation(CLIENT_DCID, SCID8, [QUIC_V1] * 300), S,
            Outcome.VN_DROPPED),
    dropped("inbound VN, DCID and SCID of 255", version_negotiation(b"\x01" * 255, b"\x02" * 255, [QUIC_V1] * 250),
            S, Outcome.VN_DROPPED),
    dropped("inbound VN, first byte 0x80", version_negotiation(CLIENT_DCID, SCID8, [QUIC_V1], first_byte=0x80), S,
            Outcome.VN_DROPPED),
    dropped("inbound VN carrying a routable DCID", version_negotiation(CID_A, SCID8, [QUIC_V1] * 300), S,
            Outcome.VN_DROPPED),
    dropped("version 0 shaped like an Initial, 1200 bytes",
            sized(long_header(0, CID_A, SCID8, pad_to=1200), 1200), S, Outcome.VN_DROPPED),
    dropped("inbound VN, switch on", version_negotiation(DCID_0B111, SCID8, [QUIC_V1]), "single+switch",
            Outcome.VN_DROPPED),
    # -- unknown versions: < 1200 dropped, >= 1200 one backend by fallback (A-2) ----
    dropped("unknown version, 9 bytes", sized(b"\xc0" + UNKNOWN_VERSION.to_bytes(4, "big") + b"\x00\x00\x00\x00", 9),
            S, Outcome.SMALL_UNKNOWN_VERSION_DROPPED),
    dropped("unknown version, DCID 21, 1199 bytes",
            sized(long_header(UNKNOWN_VERSION, DCID21_CFG1, SCID8, pad_to=1199), 1199),
            S, Outcome.SMALL_UNKNOWN_VERSION_DROPPED),
    dropped("unknown version, DCID 255, 1199 bytes",
            sized(long_header(UNKNOWN_VERSION, b"\x5a" * 255, SCID8, pad_to=1199), 1199),
            S, Outcome.SMALL_UNKNOWN_VERSION_DROPPED),
    dropped("unknown version, routable DCID, 1199 bytes",
            sized(long_header(UNKNOWN_VERSION, CID_A, SCID8, pad_to=1199), 1199),
            S, Outcome.SMALL_UNKNOWN_VERSION_DROPPED),
    dropped("greased 0x1a2a3a4a, 1199 bytes", sized(long_header(0x1A2A3A4A, CLIENT_DCID, b"", pad_to=1199), 1199),
            S, Outcome.SMALL_UNKNOWN_VERSION_DROPPED),
    dropped("greased 0x0a0a0a0a, 40 bytes", sized(long_header(0x0A0A0A0A, CLIENT_DCID, SCID8, pad_to=40), 40),
            S, Outcome.SMALL_UNKNOWN_VERSION_DROPPED),
    dropped("greased 0xfafafafa, 1199 bytes, switch on",
            sized(long_header(0xFAFAFAFA, DCID_0B111, SCID8, pad_to=1199), 1199),
            "single+switch", Outcome.SMALL_UNKNOWN_VERSION_DROPPED),
    dropped("v2 Initial, 1199 bytes, backends speak only v1",
            sized(initial(QUIC_V2, CLIENT_DCID, SCID8, pad_to=1199), 1199),
            "v1only", Outcome.SMALL_UNKNOWN_VERSION_DROPPED),
    fallback("unknown version, DCID 21, 1200 bytes",
             sized(long_header(UNKNOWN_VERSION, DCID21_CFG1, SCID8, pad_to=1200), 1200),
             S, Outcome.FALLBACK_UNKNOWN_VERSION),
    fallback("unknown version, DCID 255, 1500 bytes",
             sized(long_header(UNKNOWN_VERSION, b"\x5a" * 255, b"\x5b" * 255, pad_to=1500), 1500),
             S, Outcome.FALLBACK_UNKNOWN_VERSION),
    fallback("unknown version, empty DCID, 1200 bytes",
             sized(long_header(UNKNOWN_VERSION, b"", b"", pad_to=1200), 1200), S, Outcome.FALLBACK_UNKNOWN_VERSION),
    fallback("unknown version, fixed bit 0, 1200 bytes (RFC 8999 does not define the bit)",
             long_header(UNKNOWN_VERSION, CLIENT_DCID, SCID8, first_byte=0x80, pad_to=1200),
             S, Outcome.FALLBACK_UNKNOWN_VERSION),
    fallback("greased 0x1a2a3a4a VN probe, 1200 bytes", sized(vn_probe(CLIENT_DCID, low_bits=7), 1200), S,
             Outcome.FALLBACK_UNKNOWN_VERSION),
    fallback("greased 0xfafafafa, 1500 bytes", long_header(0xFAFAFAFA, CLIENT_DCID, SCID8, pad_to=1500), S,
             Outcome.FALLBACK_UNKNOWN_VERSION),
    fallback("v2 Initial, 1200 bytes, backends speak only v1", initial(QUIC_V2, CLIENT_DCID, SCID8), "v1only",
             Outcome.FALLBACK_UNKNOWN_VERSION),
    routed("unknown version, routable DCID, 1200 bytes (-21 §4.3.2: baseline only when unroutable)",
           long_header(UNKNOWN_VERSION, CID_B, SCID8, pad_to=1200), S, B),
    # -- long headers: fallback, never a drop (design §3 steps 3-4, design 4) --------
    fallback("v1 Initial, random client DCID (config bits not live)", initial(QUIC_V1, CLIENT_DCID, SCID8), S,
             Outcome.FALLBACK_INITIAL),
    fallback("v1 Initial, DCID too short for the config", initial(QUIC_V1, SHORT_CFG0_DCID, SCID8), S,
             Outcome.FALLBACK_INITIAL),
    fallback("v1 Initial, DCID one byte short of the config",
             initial(QUIC_V1, CID_A[:-1], SCID8), S, Outcome.FALLBACK_INITIAL),
    fallback("v1 Initial, empty DCID", initial(QUIC_V1, b"", SCID8), S, Outcome.FALLBACK_INITIAL),
    fallback("v1 Initial, 0b111 DCID", initial(QUIC_V1, DCID_0B111, SCID8), S, Outcome.FALLBACK_INITIAL),
    fallback("v1 Initial, DCID of an unknown config", initial(QUIC_V1, DCID_CFG2, SCID8), S,
             Outcome.FALLBACK_INITIAL),
    fallback("v1 0-RTT, random client DCID", long_header(QUIC_V1, CLIENT_DCID, SCID8, packet_type=1, pad_to=300), S,
             Outcome.FALLBACK_INITIAL),
    fallback("v1 Initial, DCID decodes to an unassigned server ID", initial(QUIC_V1, CID_U, SCID8), S,
             Outcome.FALLBACK_UNKNOWN_SID, passes=1),
    fallback("v1 Initial, DCID decodes to a tombstoned server ID (long headers never drop)",
             initial(QUIC_V1, CID_T, SCID8), S, Outcome.FALLBACK_UNKNOWN_SID, passes=1),
    fallback("v1 Initial, unassigned server ID, four-pass", initial(QUIC_V1, cid("four4", U), SCID8), "four4",
             Outcome.FALLBACK_UNKNOWN_SID, passes=4),
    fallback("v1 Initial, unassigned server ID, plaintext", initial(QUIC_V1, cid("plain", U), SCID8), "plain",
             Outcome.FALLBACK_UNKNOWN_SID),
    fallback("v2 Initial, random client DCID", initial(QUIC_V2, CLIENT_DCID, SCID8), S, Outcome.FALLBACK_INITIAL),
    fallback("v2 Initial, unassigned server ID", initial(QUIC_V2, CID_U, SCID8), S, Outcome.FALLBACK_UNKNOWN_SID,
             passes=1),
    fallback("v1 Initial, random DCID, switch on", initial(QUIC_V1, CLIENT_DCID, SCID8), "single+switch",
             Outcome.FALLBACK_INITIAL),
    routed("v1 Initial with the server's routable CID", initial(QUIC_V1, CID_A, SCID8), S, A),
    routed("v1 Handshake, routable CID", long_header(QUIC_V1, CID_A, SCID8, packet_type=2, payload=bytes(40)), S, A),
    routed("v1 Handshake, routable CID, draining backend", long_header(QUIC_V1, CID_B, SCID8, packet_type=2), S, B),
    routed("v1 Handshake, routable CID, unhealthy backend", long_header(QUIC_V1, CID_C, SCID8, packet_type=2), S, C),
    routed("v1 Handshake, routable CID plus 3 extra bytes (20-byte DCID)",
           long_header(QUIC_V1, cid(S, A, extra=b"\xee\xee\xee"), SCID8, packet_type=2), S, A),
    routed("v1 0-RTT, routable CID", long_header(QUIC_V1, CID_B, SCID8, packet_type=1), S, B),
    routed("v2 Initial, routable CID", initial(QUIC_V2, CID_A, SCID8), S, A),
    routed("v2 Handshake, routable CID", long_header(QUIC_V2, CID_B, SCID8, packet_type=3), S, B),
    routed("v1 Handshake, routable CID, plaintext", long_header(QUIC_V1, cid("plain", A), SCID8, packet_type=2),
           "plain", A),
    routed("v1 Handshake, routable CID, four-pass (4)", long_header(QUIC_V1, cid("four4", B), SCID8, packet_type=2),
           "four4", B),
    # -- coalesced packets: only the first packet's DCID counts (RFC 9000 §12.2) -------
    routed("coalesced Handshake(B) + 1-RTT(A)",
           long_header(QUIC_V1, CID_B, SCID8, packet_type=2, payload=bytes(30)) + short_header(CID_A), S, B),
    fallback("coalesced Initial(random DCID) + Handshake(B)",
             initial(QUIC_V1, CLIENT_DCID, SCID8, pad_to=600)
             + long_header(QUIC_V1, CID_B, SCID8, packet_type=2, pad_to=600),
             S, Outcome.FALLBACK_INITIAL),
    routed("coalesced Initial(C) + Handshake(B) + 1-RTT(A)",
           initial(QUIC_V1, CID_C, SCID8, pad_to=500) + long_header(QUIC_V1, CID_B, SCID8, packet_type=2, pad_to=500)
           + short_header(CID_A, payload_len=200), S, C),
    # -- short headers: CID routes in every mode (spec §5, §6.2) ------------------------
    *(routed(f"short header, routable, {mode}", short_header(cid(mode, A)), mode, A) for mode in CONFIGS),
    *(routed(f"short header, draining backend, {mode}", short_header(cid(mode, B, seed=3)), mode, B)
      for mode in ("single", "four4")),
    routed("short header, unhealthy backend", short_header(CID_C), S, C),
    routed("short header, first byte 0x7f", short_header(CID_A, first_byte=0x7F), S, A),
    routed("short header, exactly 1 + CID length bytes", sized(b"\x41" + CID_A, 18), S, A),
    routed("short header, CID with extra bytes", short_header(cid(S, B, extra=b"\x01\x02\x03")), S, B),
    routed("short header, routable, switch on", short_header(CID_A), "single+switch", A),
    routed("short header, draining backend, nothing takes new flows", short_header(CID_B), "drained", B),
    # -- short headers: unroutable, dropped by reason (design §3 step 5, design 4) -----
    dropped("short header, 0b111", short_header(DCID_0B111), S, Outcome.UNROUTABLE_DROPPED),
    dropped("short header, 2 bytes, 0b111", b"\x41\xe7", S, Outcome.UNROUTABLE_DROPPED),
    dropped("short header, unknown config ID", short_header(DCID_CFG2), S, Outcome.UNROUTABLE_DROPPED),
    dropped("short header, unknown config ID (config 1 without rotation)", short_header(cid("x", A, cfg=ROT1)), S,
            Outcome.UNROUTABLE_DROPPED),
    dropped("short header, too short for the config", sized(b"\x41" + CID_A[:16], 17), S,
            Outcome.UNROUTABLE_DROPPED),
    dropped("short header, 2 bytes, config 0", b"\x41\x10", S, Outcome.UNROUTABLE_DROPPED),
    dropped("short header, too short for a 4-pass config", b"\x41" + cid("four4_even", A)[:-1], "four4_even",
            Outcome.UNROUTABLE_DROPPED),
    dropped("short header, unknown server ID", short_header(CID_U), S, Outcome.UNKNOWN_SID_DROPPED, passes=1),
    dropped("short header, unknown server ID, plaintext", short_header(cid("plain", U)), "plain",
            Outcome.UNKNOWN_SID_DROPPED),
    dropped("short header, unknown server ID, four-pass (3)", short_header(cid("four3", U)), "four3",
            Outcome.UNKNOWN_SID_DROPPED, passes=3),
    dropped("short header, unknown server ID, four-pass (4)", short_header(cid("four4_even", U)), "four4_even",
            Outcome.UNKNOWN_SID_DROPPED, passes=4),
    dropped("short header, tombstoned server ID", short_header(CID_T), S, Outcome.REMOVED_BACKEND_DROPPED, passes=1),
    dropped("short header, tombstoned server ID, four-pass", short_header(cid("four3_even", T)), "four3_even",
            Outcome.REMOVED_BACKEND_DROPPED, passes=3),
    dropped("short header, no backends at all", short_header(CID_A), "empty", Outcome.UNKNOWN_SID_DROPPED, passes=1),
    # -- the short-header fallback switch (design §3 step 5) ----------------------------
    fallback("switch: short header, 0b111", short_header(DCID_0B111), "single+switch", Outcome.FALLBACK_NO_CONFIG),
    fallback("switch: short header, unknown config", short_header(DCID_CFG2), "single+switch",
             Outcome.FALLBACK_NO_CONFIG),
    fallback("switch: short header, too short", b"\x41" + CID_A[:10], "single+switch", Outcome.FALLBACK_NO_CONFIG),
    fallback("switch: short header, unknown server ID", short_header(CID_U), "single+switch",
             Outcome.FALLBACK_SHORT_UNKNOWN_SID, passes=1),
    # A removed backend's ID is dropped even with the switch on (acceptance design implication 4):
    # its connections are gone, and any other backend could only answer garbage.
    dropped("switch: short header, tombstoned server ID", short_header(CID_T), "single+switch",
            Outcome.REMOVED_BACKEND_DROPPED, passes=1),
    fallback("switch: short header, unknown server ID, four-pass", short_header(cid("four4", U)), "four4+switch",
             Outcome.FALLBACK_SHORT_UNKNOWN_SID, passes=4),
    # -- nothing takes new flows -------------------------------------------------------
    dropped("no eligible backend: v1 Initial", initial(QUIC_V1, CLIENT_DCID, SCID8), "drained",
            Outcome.NO_BACKEND_DROPPED),
    dropped("no eligible backend: v1 Initial, unassigned server ID", initial(QUIC_V1, CID_U, SCID8), "drained",
            Outcome.NO_BACKEND_DROPPED, passes=1),
    dropped("no eligible backend: unknown version, 1200 bytes", vn_probe(CLIENT_DCID), "drained",
            Outcome.NO_BACKEND_DROPPED),
    dropped("no eligible backend: switch, short header 0b111", short_header(DCID_0B111), "drained+switch",
            Outcome.NO_BACKEND_DROPPED),
    dropped("no eligible backend: switch, short header unknown server ID", short_header(CID_U), "drained+switch",
            Outcome.NO_BACKEND_DROPPED, passes=1),
    dropped("no backends at all: v1 Initial", initial(QUIC_V1, CLIENT_DCID, SCID8), "empty",
            Outcome.NO_BACKEND_DROPPED),
    dropped("no backends at all: switch, short header 0b111", short_header(DCID_0B111), "empty+switch",
            Outcome.NO_BACKEND_DROPPED),
    # -- rotation: two live configurations (spec §3.1) ------------------------------------
    routed("rotation: config 0 short header", short_header(CID_A), "rotation", A, passes=1),
    routed("rotation: config 1 short header", short_header(cid("x", B, cfg=ROT1)), "rotation", B, config_id=1,
           passes=3),
    routed("rotation: config 1 Handshake", long_header(QUIC_V1, cid("x", A, cfg=ROT1), SCID8, packet_type=2),
           "rotation", A, config_id=1, passes=3),
    dropped("rotation: config 1 short header, unknown server ID", short_header(cid("x", U, cfg=ROT1)), "rotation",
            Outcome.UNKNOWN_SID_DROPPED, passes=3),
    dropped("rotation: config 2 short header", short_header(DCID_CFG2), "rotation", Outcome.UNROUTABLE_DROPPED),
    fallback("rotation: config 1 Initial, unassigned server ID", initial(QUIC_V1, cid("x", U, cfg=ROT1), SCID8),
             "rotation", Outcome.FALLBACK_UNKNOWN_SID, passes=3),
    # -- retry offload and stateless resets (issue 9; more in test_retry_offload.py) -----------
    dropped("retry: tokenless v1 Initial, client DCID", initial(QUIC_V1, CLIENT_DCID, SCID8), "retry",
            Outcome.RETRY_SENT),
    dropped("retry: tokenless v2 Initial, unassigned server ID", initial(QUIC_V2, CID_U, SCID8), "retry",
            Outcome.RETRY_SENT, passes=1),
    routed("retry: tokenless Initial to a live backend's CID (second flight)", initial(QUIC_V1, CID_A, SCID8),
           "retry", A, passes=2),
    dropped("retry: Initial with a forged token", initial(QUIC_V1, CLIENT_DCID, SCID8, token=bytes(60)),
            "retry", Outcome.TOKEN_REJECTED),
    malformed("retry: tokenless Initial under 1200 bytes", initial(QUIC_V1, CLIENT_DCID, SCID8, pad_to=1100),
              "small_initial", "retry"),
    malformed("retry: tokenless Initial with a 7-byte DCID", initial(QUIC_V1, CLIENT_DCID[:7], SCID8),
              "initial_dcid", "retry"),
    routed("retry: short header, live backend", short_header(CID_A), "retry", A),
    dropped("reset: short header of a removed backend", short_header(CID_T), "retry", Outcome.RESET_SENT,
            passes=1),
    dropped("reset: removed backend, trigger too short to answer", short_header(CID_T, payload_len=3), "retry",
            Outcome.REMOVED_BACKEND_DROPPED, passes=1),
]
#: Outcomes that need more than one datagram to reach (covered in test_retry_offload.py).
MULTI_DATAGRAM_OUTCOMES = {Outcome.RETRY_RATE_LIMITED}


def test_rows_are_unique_and_cover_every_outcome_and_reason() -> None:
    descs = [r.desc for r in ROWS]
    assert len(descs) == len(set(descs))
    assert {r.outcome for r in ROWS} | MULTI_DATAGRAM_OUTCOMES == set(Outcome)
    reasons = {k.split(":", 1)[1] for r in ROWS for k in r.extra if k.startswith("malformed:")}
    assert reasons == {"empty", "truncated", "fixed_bit", "cid_too_long", "small_initial", "initial_dcid"}


#: The router's two entry points; shared tests run through both (route_batch with batches of one,
#: as the asyncio adapter calls it; tests/core/test_router_batch.py covers real batches).
ENTRIES = ("route", "route_batch")


def route_via(entry: str, router: Router, datagram: bytes, client: tuple[str, int]) -> tuple[Outcome, Backend | None]:
    if entry == "route":
        return router.route(datagram, client)
    return router.route_batch(datagram, 0, [len(datagram)], lambda _: client)[0]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("row", ROWS, ids=[r.desc for r in ROWS])
def test_outcome_table(row: Row, entry: str) -> None:
    tbl = table(row.table)
    router = Router(tbl, clock=lambda: 1_700_000_000.0)
    before = snapshot(router)
    outcome, backend = route_via(entry, router, row.datagram, CLIENT)
    assert outcome == row.outcome
    if row.backend is None:
        assert backend is None
    else:
        mode = row.table.split("+", maxsplit=1)[0]
        sid_len = CONFIGS[mode].server_id_len if mode in CONFIGS else 1
        assert backend == tbl.backends[sid(row.backend, sid_len)]
    assert outcome.forwards == (backend is not None)
    assert deltas(before, snapshot(router)) == row.expected_deltas()
    assert_counters_consistent(router)
    # The decision does not change on a second look (decode cache, if any, is invisible).
    assert route_via(entry, router, row.datagram, CLIENT) == (outcome, backend)
    assert_counters_consistent(router)


def test_counter_names_match_acceptance() -> None:
    # acceptance §4 and design implication 4: each named counter is an outcome.
    names = {o.name.lower() for o in Outcome}
    for counter in (
        "cid_routed",
        "unknown_sid_dropped",
        "removed_backend_dropped",
        "unroutable_dropped",
        "malformed_dropped",
        "small_unknown_version_dropped",
        "vn_dropped",
    ):
        assert counter in names
    reasons = {o.fallback_reason for o in Outcome if o.fallback_reason}
    assert {"initial", "unknown_sid", "no_config"} <= reasons
    assert all(o.forwards == (o.fallback_reason is not None or o == Outcome.CID_ROUTED) for o in Outcome)


# --- F-1: random datagrams never escape, counters sum to the input ---------------

FUZZ_VERSIONS = (QUIC_V1, QUIC_V2, 0, 0x1A2A3A4A, 0xFAFAFAFA, UNKNOWN_VERSION, 0xFF00001D)


def random_datagram(rng: random.Random, routable: list[bytes]) -> bytes:
    """F-1: 0..1500 bytes, first byte biased to 0x40-0x7f / 0xc0-0xff, DCID length 0..255."""
    size = rng.choice((rng.randrange(0, 30), rng.randrange(0, 1200), rng.randrange(1150, 1501)))
    pick = rng.random()
    if pick < 0.45:
        first = rng.randrange(0x40, 0x80)
    elif pick < 0.9:
        first = rng.randrange(0xC0, 0x100)
    else:
        first = rng.randrange(0x100)
    if not first & 0x80:
        body = rng.choice(routable) if rng.random() < 0.3 else rng.randbytes(20)
        data = bytes([first]) + body + rng.randbytes(max(0, size - 21))
    else:
        dcid_len = rng.choice((rng.randrange(0, 256), rng.randrange(0, 22), 17))
        dcid = rng.choice(routable) if rng.random() < 0.2 else rng.randbytes(dcid_len)
        scid = rng.randbytes(rng.choice((0, 8, 20, rng.randrange(0, 256))))
        version = rng.choice(FUZZ_VERSIONS) if rng.random() < 0.8 else rng.getrandbits(32)
        data = (
            bytes([first])
            + version.to_bytes(4, "big")
            + bytes([len(dcid)])
            + dcid
            + bytes([len(scid)])
            + scid
        )
        data += rng.randbytes(max(0, size - len(data)))
    if rng.random() < 0.3:
        data = data[:size]  # truncate anywhere
    return data


def random_client(rng: random.Random) -> tuple[str, int]:
    if rng.random() < 0.8:
        return (f"198.51.{rng.randrange(256)}.{rng.randrange(256)}", rng.randrange(1, 65536))
    return (f"2001:db8::{rng.randrange(1 << 16):x}", rng.randrange(1, 65536))


def expected_sid(tbl: ServiceTable, datagram: bytes) -> bytes | None:
    """An independent reading of spec §6.2: the DCID's server ID via the public codec."""
    dcid = datagram[6 : 6 + datagram[5]] if datagram[0] & 0x80 else datagram[1:]
    return decode_server_id(list(tbl.cid_configs), dcid)


@pytest.mark.parametrize("kind", ["single", "four4+switch", "rotation", "drained", "plain+switch", "retry"])
def test_f1_random_datagrams(kind: str) -> None:
    tbl = table(kind)
    rng = random.Random(f"F-1 {kind}")
    routable = [cid(m, k, seed=s) for m in ("single", "four4", "plain") for k in (A, B, C, T, U) for s in range(3)]
    routable += [cid("x", k, cfg=ROT1) for k in (A, B, U)]
    router = Router(tbl, cache_size=256, clock=lambda: 1_700_000_000.0)
    n = {"single": 100_000, "retry": 20_000}.get(kind, 2_500)  # acceptance F-1: 10^5 in CI
    seen: Counter[Outcome] = Counter()
    for _ in range(n):
        datagram = random_datagram(rng, routable)
        outcome, backend = router.route(datagram, random_client(rng))
        seen[outcome] += 1
        assert outcome.forwards == (backend is not None)
        if backend is not None:
            assert tbl.backends[backend.server_id] == backend
        if outcome == Outcome.CID_ROUTED:
            assert backend is not None
            assert backend.server_id == expected_sid(tbl, datagram)
        elif outcome.forwards:
            assert backend is not None
            assert backend.takes_new_flows  # fallback never picks a draining or down backend
        if datagram and datagram[0] & 0x80 and len(datagram) >= 5 and datagram[1:5] == bytes(4):
            assert not outcome.forwards  # F-2: version 0 is never forwarded
    stats = router.stats()
    assert stats.rx_client_datagrams == n
    assert stats.total_outcomes() == n
    assert_counters_consistent(router)
    assert stats.cache_entries <= 256
    # The generator reaches the interesting outcomes, not only malformed drops.
    assert seen[Outcome.CID_ROUTED] > 0
    assert seen[Outcome.MALFORMED_DROPPED] > 0
    assert seen[Outcome.SMALL_UNKNOWN_VERSION_DROPPED] > 0


def test_f1_every_first_byte_and_small_size() -> None:
    rng = random.Random("F-1 exhaustive")
    router = Router(table("single+switch"))
    n = 0
    for first in range(256):
        for size in range(1, 40):
            router.route(bytes([first]) + rng.randbytes(size - 1), CLIENT)
            n += 1
    assert router.stats().total_outcomes() == n == router.stats().rx_client_datagrams


# --- D-2: garbage short headers rarely reach a backend ------------------------------


@pytest.mark.parametrize(("mode", "n"), [("single", 100_000), ("plain", 100_000), ("four3", 100_000)])
def test_d2_random_short_headers(mode: str, n: int) -> None:
    # All backends configured (switch off), three IDs assigned in 1-byte server IDs.
    tbl = table(mode)
    assigned = len(tbl.backends)
    assert assigned == 3 and tbl.cid_configs[0].server_id_len == 1
    rng = random.Random(f"D-2 {mode}")
    router = Router(tbl)
    forwarded = 0
    for _ in range(n):
        # Worst case: config bits always name the live configuration.
        dcid = bytes([rng.randrange(0x20)]) + rng.randbytes(19)
        outcome, backend = router.route(b"\x41" + dcid + bytes(20), random_client(rng))
        if backend is not None:
            assert outcome == Outcome.CID_ROUTED
            forwarded += 1
    assert forwarded / n <= assigned / 2 ** (8 * 1) + 0.001
    assert router.stats().total_outcomes() == n


def test_d2_long_server_ids_almost_never_forwarded() -> None:
    tbl = table("four4")  # 5-byte server IDs: 3 / 2^40
    rng = random.Random("D-2 four4")
    router = Router(tbl)
    for _ in range(5_000):
        assert router.route(b"\x41" + bytes([rng.randrange(0x20)]) + rng.randbytes(19), CLIENT)[1] is None


# --- D-3: cheap checks come before any cipher call ------------------------------------


def d3_datagrams(rng: random.Random, tbl: ServiceTable) -> list[tuple[str, bytes]]:
    cfg = tbl.cid_configs[0]
    cid_len = cfg.cid_len
    dead = sorted(set(range(8)) - {c.config_id for c in tbl.cid_configs})
    real = [cid("x", k, seed=s, cfg=cfg) for k in (A, B, U) for s in range(4)]
    out: list[tuple[str, bytes]] = []
    for _ in range(10_000 // 9 + 1):
        full = rng.choice(real) if rng.random() < 0.5 else bytes([rng.randrange(0x20)]) + rng.randbytes(cid_len)
        dead_cfg = bytes([rng.choice(dead) << 5 | rng.randrange(0x20)]) + rng.randbytes(19)
        out += [
            ("short fixed bit", bytes([rng.randrange(0x40)]) + full + rng.randbytes(20)),
            ("short too short", bytes([0x40 | rng.randrange(0x40)]) + full[: rng.randrange(cid_len)]),
            ("short config", bytes([0x40 | rng.randrange(0x40)]) + dead_cfg + rng.randbytes(10)),
            ("long config", initial(QUIC_V1, dead_cfg[: rng.randrange(8, 21)], SCID8)),
            ("long too short", initial(QUIC_V1, full[: rng.randrange(1, cid_len)], SCID8)),
            ("long fixed bit", long_header(QUIC_V1, full, SCID8, first_byte=0x80 | rng.randrange(0x40), pad_to=1200)),
            ("long small unknown version", long_header(UNKNOWN_VERSION, full, SCID8, pad_to=rng.randrange(30, 1200))),
            ("long version 0", version_negotiation(full, SCID8, [QUIC_V1] * rng.randrange(1, 400))),
            ("long cid too long", long_header(QUIC_V1, full + rng.randbytes(21 - cid_len + rng.randrange(10)), b"")),
        ]
    return out[:10_000]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kind", ["single+switch", "four4", "rotation"])
def test_d3_cheap_checks_cost_no_cipher_call(kind: str, entry: str) -> None:
    tbl = table(kind)
    rng = random.Random(f"D-3 {kind}")
    router = Router(tbl)
    for label, datagram in d3_datagrams(rng, tbl):
        outcome, _ = route_via(entry, router, datagram, random_client(rng))
        assert outcome not in (Outcome.CID_ROUTED, Outcome.FALLBACK_UNKNOWN_SID, Outcome.UNKNOWN_SID_DROPPED), label
    stats = router.stats()
    assert stats.rx_client_datagrams == 10_000
    assert stats.cipher_calls == 0


def test_cipher_calls_per_decode_match_the_spec() -> None:
    # spec §0: plaintext 0, single pass 1, four-pass 3 when nonce_len >= sid_len, else 4;
    # S-11: a valid and an invalid server ID cost the same.
    for mode, passes in PASSES.items():
        for k in (A, U, T):
            router = Router(table(mode))
            router.route(short_header(cid(mode, k, seed=7)), CLIENT)
            assert router.stats().cipher_calls == passes, (mode, k)


# --- determinism and the 4-tuple fallback ---------------------------------------------


def spread_table(*, vip: tuple[str, int] = VIP, switch: bool = False) -> ServiceTable:
    backends = [Backend(sid(k), backend_address(k)) for k in (1, 2, 3)]
    backends += [Backend(sid(4), backend_address(4), draining=True), Backend(sid(5), backend_address(5), healthy=False)]
    return make_table([CONFIGS["single"]], backends, tombstones=[sid(T + 10)], short_header_fallback=switch, vip=vip)


def mixed_datagrams(seed: str, n: int) -> list[tuple[bytes, tuple[str, int]]]:
    rng = random.Random(seed)
    routable = [cid("single", k, seed=s) for k in range(1, 10) for s in range(4)]
    return [(random_datagram(rng, routable), random_client(rng)) for _ in range(n)]


def test_same_table_same_decisions() -> None:
    inputs = mixed_datagrams("determinism", 3000)
    r1, r2 = Router(spread_table(switch=True)), Router(spread_table(switch=True), cache_size=1)
    first = [r1.route(d, c) for d, c in inputs]
    assert [r2.route(d, c) for d, c in inputs] == first
    assert [r1.route(d, c) for d, c in inputs] == first  # again, with a warm cache
    r3 = Router(spread_table(switch=True))
    assert [r3.route(d, c) for d, c in reversed(inputs)] == list(reversed(first))  # order-free


_R5_SCRIPT = """
import hashlib, random, sys
sys.path.insert(0, sys.argv[1])
from lb import CidConfig, encode_cid
from lb.core.router import Router
from lb.core.service_table import Backend, build_service_table
cfg = CidConfig(0, 1, 15, key=bytes(range(16)))
backends = [Backend(bytes([k]), ("10.0.0.%d" % k, 4000 + k)) for k in range(1, 6)]
tbl = build_service_table(name="s", vip=("192.0.2.10", 443), cid_configs=[cfg], backends=backends,
                          fallback_key=bytes(range(32)), short_header_fallback=True)
router = Router(tbl)
rng = random.Random(5)
h = hashlib.sha256()
for i in range(3000):
    first = rng.choice((0x41, 0xc0))
    body = encode_cid(cfg, bytes([rng.randrange(1, 9)]), rng.randbytes(15)) if i % 3 == 0 else rng.randbytes(17)
    if first == 0x41:
        data = bytes([first]) + body + bytes(10)
    else:
        data = bytes([first, 0, 0, 0, 1, len(body)]) + body + bytes([0, 0, 0x44, 0xa0]) + bytes(1200)
    client = ("198.51.100.%d" % rng.randrange(256), rng.randrange(1, 65536))
    outcome, backend = router.route(data, client)
    h.update(b"%d:%s;" % (outcome, backend.server_id.hex().encode() if backend else b"-"))
print(h.hexdigest())
"""


def test_r5_decisions_do_not_depend_on_pythonhashseed() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    digests = set()
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", _R5_SCRIPT, root], env=env, capture_output=True, text=True, timeout=60, check=True
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1
    (digest,) = digests
    assert len(digest) == len(hashlib.sha256().hexdigest())  # the script ran to the end


def test_fallback_keys_on_the_four_tuple_not_the_dcid() -> None:
    tbl, tbl_switch = spread_table(), spread_table(switch=True)
    router, router_switch = Router(tbl), Router(tbl_switch)
    rng = random.Random("4-tuple")
    for _ in range(300):
        client = random_client(rng)
        first_dcid = bytes([0x20 | rng.randrange(0x20)]) + rng.randbytes(rng.randrange(8, 20))  # config bits 1
        retry_dcid = cid("single", U + rng.randrange(100), seed=rng.randrange(99))  # decodes to an unassigned ID
        decisions = [
            router.route(initial(QUIC_V1, first_dcid, SCID8), client),
            router.route(initial(QUIC_V1, first_dcid, SCID8, pad_to=1300), client),  # retransmit
            router.route(long_header(QUIC_V1, first_dcid, SCID8, packet_type=1, pad_to=200), client),  # 0-RTT
            router.route(initial(QUIC_V1, retry_dcid, SCID8, token=b"retry-token"), client),  # after a Retry
            router.route(initial(QUIC_V2, rng.randbytes(8), SCID8), client),
            router.route(vn_probe(rng.randbytes(12)), client),  # unknown version, full size
            router_switch.route(short_header(DCID_0B111), client),
            router_switch.route(short_header(cid("single", U)), client),
        ]
        outcomes = [o for o, _ in decisions]
        assert Outcome.CID_ROUTED not in outcomes, outcomes
        backends = {b for _, b in decisions}
        assert len(backends) == 1, (client, decisions)
        (only,) = backends
        assert only is not None and only.takes_new_flows


def test_fallback_spreads_over_eligible_backends_only() -> None:
    router = Router(spread_table())
    rng = random.Random("spread")
    hits: Counter[bytes] = Counter()
    for port in range(20000, 23000):
        _, backend = router.route(initial(QUIC_V1, rng.randbytes(8), SCID8), ("198.51.100.7", port))
        assert backend is not None
        hits[backend.server_id] += 1
    assert set(hits) == {sid(1), sid(2), sid(3)}  # never the draining (4) or unhealthy (5) one
    assert min(hits.values()) > 3000 / 3 * 0.8
    # Their own CIDs still route to them.
    assert router.route(short_header(cid("single", 4)), CLIENT)[0] == Outcome.CID_ROUTED
    assert router.route(short_header(cid("single", 5)), CLIENT)[1] == spread_table().backends[sid(5)]


def test_fallback_depends_on_the_whole_four_tuple() -> None:
    a, other_vip_port = Router(spread_table()), Router(spread_table(vip=("192.0.2.10", 8443)))
    rng = random.Random("vip")
    packet = initial(QUIC_V1, CLIENT_DCID, SCID8)
    clients = [random_client(rng) for _ in range(200)]
    assert any(a.route(packet, c) != other_vip_port.route(packet, c) for c in clients)
    assert len({a.route(packet, ("203.0.113.5", p))[1] for p in range(1000, 1064)}) > 1
    assert len({a.route(packet, (f"203.0.113.{h}", 4433))[1] for h in range(1, 65)}) > 1
    # A dual-stack socket reports an IPv4 client as ::ffff:a.b.c.d: same flow, same backend.
    for ip, port in clients:
        if ":" not in ip:
            assert a.route(packet, (f"::ffff:{ip}", port)) == a.route(packet, (ip, port))


def test_fallback_accepts_socket_style_ipv6_addresses() -> None:
    # asyncio reports IPv6 peers as (host, port, flowinfo, scope_id); only host and port count.
    router = Router(spread_table())
    packet = initial(QUIC_V1, CLIENT_DCID, SCID8)
    for port in range(7000, 7050):
        two = router.route(packet, ("2001:db8::77", port))
        assert router.route(packet, ("2001:db8::77", port, 0, 0)) == two  # type: ignore[arg-type]
        assert router.route(packet, ("2001:db8:0:0::77", port)) == two


def test_fallback_key_is_a_shared_secret() -> None:
    # S-6 in small: another fallback key gives another assignment (not Python's hash()).
    backends = [Backend(sid(k), backend_address(k)) for k in (1, 2, 3)]
    other = build_service_table(
        name="svc", vip=VIP, cid_configs=[CONFIGS["single"]], backends=backends, fallback_key=b"another key",
        maglev_size=MAGLEV_SIZE,
    )
    r1, r2 = Router(make_table([CONFIGS["single"]], backends)), Router(other)
    packet = initial(QUIC_V1, CLIENT_DCID, SCID8)
    clients = [("198.51.100.9", p) for p in range(3000, 3300)]
    same = sum(r1.route(packet, c) == r2.route(packet, c) for c in clients)
    assert same < 0.6 * len(clients)  # about 1/3 expected


# --- the decode cache ------------------------------------------------------------------


def test_cache_is_bounded() -> None:
    router = Router(table("single"), cache_size=4)
    rng = random.Random("cache")
    issued = [CidIssuer(CONFIGS["single"], sid(k)) for k in (A, B, C)]
    for i in range(300):
        issuer = issued[i % 3]
        dcid = issuer.next_cid()
        packet = short_header(dcid) if i % 2 else long_header(QUIC_V1, dcid, SCID8, packet_type=2)
        outcome, backend = router.route(packet, random_client(rng))
        assert outcome == Outcome.CID_ROUTED
        assert backend is not None and backend.server_id == issuer.server_id
        assert router.stats().cache_entries <= 4
    # A flood of garbage does not grow it either.
    for _ in range(2000):
        router.route(b"\x41" + bytes([rng.randrange(0x20)]) + rng.randbytes(30), CLIENT)
        assert router.stats().cache_entries <= 4


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(("size", "decodes", "evictions"), [(0, 6, 0), (1, 4, 3)])
def test_tiny_or_disabled_cache_never_escapes(entry: str, size: int, decodes: int, evictions: int) -> None:
    # Pinned: cache_size 0 disables the cache (every datagram decoded, nothing kept), 1 keeps the
    # latest DCID only; both route exactly like the default cache. Negative sizes are refused.
    router = Router(table("single"), cache_size=size)
    for k in (A, A, B, B, A, C):  # size 1: miss, hit, miss (evicts A), hit, miss, miss
        outcome, backend = route_via(entry, router, short_header(cid("single", k)), CLIENT)
        assert outcome == Outcome.CID_ROUTED
        assert backend == table("single").backends[sid(k)]
        assert router.stats().cache_entries == size
    stats = router.stats()
    assert (stats.cipher_calls, stats.cache_evictions) == (decodes, evictions)
    with pytest.raises(ValueError, match="cache_size"):
        Router(table("single"), cache_size=-1)


def test_set_table_clears_the_cache_and_keeps_the_counters() -> None:
    router = Router(table("single"))
    for k in (A, B, C):
        router.route(short_header(cid("single", k)), CLIENT)
    router.route(b"", CLIENT)
    assert router.stats().cache_entries == 3
    before = snapshot(router)
    router.set_table(table("rotation"))
    assert router.stats().cache_entries == 0
    assert snapshot(router) == before  # counters are monotonic, never reset by a reload (acceptance §4)


def test_table_swaps_never_move_a_cid_routed_connection() -> None:
    cfg = CONFIGS["single"]
    dcid = cid("single", B, seed=11)
    packets = [short_header(dcid), long_header(QUIC_V1, dcid, SCID8, packet_type=2)]
    base = [Backend(sid(k), backend_address(k)) for k in (A, B, C)]
    router = Router(make_table([cfg], base))
    assert {router.route(p, CLIENT)[1] for p in packets} == {base[1]}  # now cached
    # Drain B, add D: B's connection stays, and the router hands out the *new* B.
    drained = [base[0], Backend(sid(B), backend_address(B), draining=True), base[2]]
    drained.append(Backend(sid(5), backend_address(5)))
    router.set_table(make_table([cfg], drained))
    for p in packets:
        outcome, backend = router.route(p, CLIENT)
        assert outcome == Outcome.CID_ROUTED
        assert backend is not None and backend.draining and backend.server_id == sid(B)
    # B moves to another address: the cache must not keep the old one.
    moved = Backend(sid(B), ("10.9.9.9", 9999))
    router.set_table(make_table([cfg], [base[0], moved, base[2]]))
    assert router.route(packets[0], CLIENT)[1] == moved
    # B is removed and tombstoned: short headers drop, long headers take the fallback, never B.
    router.set_table(make_table([cfg], [base[0], base[2]], tombstones=[sid(B)]))
    assert router.route(packets[0], CLIENT) == (Outcome.REMOVED_BACKEND_DROPPED, None)
    outcome, backend = router.route(packets[1], CLIENT)
    assert outcome == Outcome.FALLBACK_UNKNOWN_SID
    assert backend is not None and backend.server_id != sid(B)
    # Config 0 reused with a new key: the old CID decodes afresh, never through the stale cache.
    rekeyed = CidConfig(config_id=0, server_id_len=1, nonce_len=15, key=K1)
    router.set_table(make_table([rekeyed], base))
    fresh = Router(make_table([rekeyed], base))
    assert router.route(packets[0], CLIENT) == fresh.route(packets[0], CLIENT)


def test_cache_is_invisible_across_swaps() -> None:
    tables = [table("single"), table("rotation"), table("single+switch"), table("drained"), table("empty")]
    inputs = mixed_datagrams("cache swaps", 1500)
    rng = random.Random("swaps")
    cached = Router(tables[0], cache_size=8)
    for i, (datagram, client) in enumerate(inputs):
        if i % 100 == 0:
            cached.set_table(rng.choice(tables))
        assert cached.route(datagram, client) == Router(cached.table).route(datagram, client)


# --- hypothesis: an issued CID routes to its issuer in any header ------------------------


@settings(max_examples=150, deadline=None)
@given(
    mode=st.sampled_from(sorted(CONFIGS)),
    k=st.sampled_from([A, B, C]),
    form=st.sampled_from(["short", "v1-initial", "v1-handshake", "v1-0rtt", "v2-handshake", "unknown-1200"]),
    first_low=st.integers(0, 0x3F),
    payload=st.integers(0, 1300),
    switch=st.booleans(),
)
def test_issued_cids_route_to_their_issuer(
    mode: str, k: int, form: str, first_low: int, payload: int, switch: bool
) -> None:
    cfg = CONFIGS[mode]
    tbl = table(mode + ("+switch" if switch else ""))
    dcid = CidIssuer(cfg, sid(k, cfg.server_id_len)).next_cid()
    if form == "short":
        packet = short_header(dcid, payload_len=payload, first_byte=0x40 | first_low)
    elif form == "unknown-1200":
        packet = long_header(UNKNOWN_VERSION, dcid, SCID8, pad_to=1200 + payload % 300)
    else:
        version = QUIC_V2 if form.startswith("v2") else QUIC_V1
        ptype = {"v1-initial": 0, "v1-handshake": 2, "v1-0rtt": 1, "v2-handshake": 3}[form]
        packet = long_header(version, dcid, SCID8, packet_type=ptype, pad_to=payload)
    outcome, backend = Router(tbl).route(packet, CLIENT)
    assert outcome == Outcome.CID_ROUTED
    assert backend == tbl.backends[sid(k, cfg.server_id_len)]
