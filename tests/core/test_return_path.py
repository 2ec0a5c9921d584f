"""The stateless return path: design.md §4 trust rules, acceptance A-7 and S-8.

A backend sends each reply to the LB's inside address behind a PROXY v2
header: source = the client, destination = the VIP. The LB accepts only
configured backend addresses, only towards its own VIPs, always reads the
outermost header only, and counts every datagram exactly once.
"""

from __future__ import annotations

import random
import struct

import pytest

from lb.core.addresses import Address
from lb.core.cid_config import CidConfig
from lb.core.cid_encoder import encode_cid
from lb.core.encapsulation import PROXY_V2_SIGNATURE, encode_proxy_header
from lb.core.health import build_probe, probe_reply_nonce_untrusted
from lb.core.return_path import ReturnOutcome, ReturnPath, ReturnStats
from lb.core.service_table import Backend, ServiceTable, build_service_table
from quiclb_harness.datagrams import short_header, version_negotiation

BACKEND1 = ("10.0.0.1", 4001)
BACKEND2 = ("10.0.0.2", 4002)
BACKEND6 = ("2001:db8::5", 4005)
VIP = ("192.0.2.10", 443)
VIP6 = ("2001:db8::10", 443)
OTHER_VIP = ("192.0.2.99", 443)
INSIDE = ("127.0.0.1", 4434)
CLIENT = ("203.0.113.9", 51000)
CLIENT6 = ("2001:db8:1::9", 51000)
PAYLOAD = short_header(bytes(range(1, 18)), payload_len=40)

#: The MalformedDatagram reasons of the PROXY v2 decoder (lb/core/encapsulation.py, rule 1).
PROXY_REASONS = {
    "proxy_signature",
    "proxy_version",
    "proxy_command",
    "proxy_local",
    "proxy_family",
    "proxy_length",
    "proxy_tlv",
    "truncated",
}


CFG = CidConfig(config_id=0, server_id_len=2, nonce_len=6, key=bytes(range(16)))


def table(name: str, vip: Address, backends: list[Address], cfg: CidConfig = CFG) -> ServiceTable:
    """A service whose backends have server IDs 0001, 0002, ... in the order given."""
    return build_service_table(
        name=name, vip=vip, cid_configs=[cfg], fallback_key=bytes(16), maglev_size=1009,
        backends=[Backend(server_id=(i + 1).to_bytes(2, "big"), address=a) for i, a in enumerate(backends)],
    )


def make_path() -> ReturnPath:
    # Two tenants: service "a" on VIP with BACKEND1 and BACKEND2, service "b" on VIP6 with BACKEND6.
    return ReturnPath([table("a", VIP, [BACKEND1, BACKEND2]), table("b", VIP6, [BACKEND6])], own_addresses=[INSIDE])


def reply(client: tuple[str, int] = CLIENT, vip: tuple[str, int] = VIP, payload: bytes = PAYLOAD) -> bytes:
    return encode_proxy_header(client, vip) + payload


def check_sums(path: ReturnPath) -> ReturnStats:
    s = path.stats()
    assert s.rx_backend_datagrams == s.tx_to_client + sum(s.rejected.values())
    return s


# --- accepted replies ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "client", "vip"),
    [
        (BACKEND1, CLIENT, VIP),
        (BACKEND2, ("198.51.100.200", 1), VIP),
        (BACKEND6, CLIENT6, VIP6),
        (("::ffff:10.0.0.1", 4001), CLIENT, VIP),  # dual-stack socket spelling of BACKEND1
        (BACKEND1, ("::ffff:203.0.113.9", 51000), ("::ffff:192.0.2.10", 443)),  # written as INET
        (("2001:0db8:0000::5", 4005), CLIENT6, VIP6),  # non-canonical spelling of BACKEND6
    ],
    ids=["v4", "v4-other-backend", "v6", "mapped-source", "mapped-header", "uncompressed-v6-source"],
)
def test_accepted_reply_goes_to_the_client_from_the_vip(
    source: tuple[str, int], client: tuple[str, int], vip: tuple[str, int]
) -> None:
    path = make_path()
    decision = path.handle(reply(client, vip), source)
    assert decision.outcome == ReturnOutcome.TO_CLIENT
    assert decision.payload == PAYLOAD
    expected_client = ("203.0.113.9", 51000) if client[0].startswith("::ffff:") else client
    expected_vip = VIP if vip[0].startswith("::ffff:") else vip
    assert decision.client == expected_client
    assert decision.vip == expected_vip
    s = check_sums(path)
    assert (s.rx_backend_datagrams, s.tx_to_client, s.tx_client_bytes) == (1, 1, len(PAYLOAD))
    assert s.rejected == {}


def test_backend_configured_as_mapped_address_accepts_plain_ipv4_source() -> None:
    path = ReturnPath([table("a", ("::ffff:192.0.2.10", 443), [("::ffff:10.0.0.7", 4007)])])
    decision = path.handle(reply(), ("10.0.0.7", 4007))
    assert decision.outcome == ReturnOutcome.TO_CLIENT
    assert decision.vip == VIP


def test_unknown_tlvs_are_skipped() -> None:
    path = make_path()
    datagram = encode_proxy_header(CLIENT, VIP, tlvs=[(0xE0, b"future retry offload"), (0x04, b"")]) + PAYLOAD
    decision = path.handle(datagram, BACKEND1)
    assert (decision.outcome, decision.client, decision.vip, decision.payload) == (
        ReturnOutcome.TO_CLIENT,
        CLIENT,
        VIP,
        PAYLOAD,
    )


@pytest.mark.parametrize("inner", ["proxy-v4", "proxy-v6", "signature-only", "whole-reply"])
def test_payload_that_looks_like_a_proxy_header_stays_opaque(inner: str) -> None:
    # A-7 / design §4: the LB writes the only header; client bytes that look like one are payload.
    evil = ("198.18.0.66", 53)
    payload = {
        "proxy-v4": encode_proxy_header(evil, VIP) + b"reflect me",
        "proxy-v6": encode_proxy_header(("2001:db8:bad::1", 53), VIP6) + b"reflect me",
        "signature-only": PROXY_V2_SIGNATURE,
        "whole-reply": reply(evil, OTHER_VIP),
    }[inner]
    path = make_path()
    decision = path.handle(reply(CLIENT, VIP, payload), BACKEND1)
    assert decision.outcome == ReturnOutcome.TO_CLIENT
    assert decision.client == CLIENT
    assert decision.vip == VIP
    assert decision.payload == payload


def test_empty_payload_is_still_one_reply() -> None:
    path = make_path()
    decision = path.handle(reply(payload=b""), BACKEND1)
    assert decision.outcome == ReturnOutcome.TO_CLIENT
    assert decision.payload == b""
    assert check_sums(path).tx_client_bytes == 0


# --- rejected: wrong source (checked before anything is parsed) -------------------------


@pytest.mark.parametrize(
    "source",
    [
        ("10.0.0.1", 4002),  # a backend's IP, another port
        ("10.0.0.9", 4001),  # another IP, a backend's port
        CLIENT,
        VIP,
        INSIDE,
        ("::1", 4001),
        ("2001:db8::5", 4001),
        ("::ffff:10.0.0.2", 4001),
        ("not an address", 4001),
        ("", 0),
    ],
    ids=repr,
)
@pytest.mark.parametrize("valid_header", [True, False], ids=["valid-header", "garbage"])
def test_non_backend_sources_are_rejected(source: tuple[str, int], valid_header: bool) -> None:
    path = make_path()
    datagram = reply() if valid_header else b"\x00garbage"
    decision = path.handle(datagram, source)
    assert decision.outcome == ReturnOutcome.REJECTED
    assert decision.reason == "source"
    assert decision.client is None
    assert decision.payload == b""
    s = check_sums(path)
    assert s.rejected == {"source": 1}
    assert s.tx_to_client == 0


def test_a7_no_open_relay() -> None:
    # 10^3 datagrams from non-backends, half with perfect headers: 0 sent, each counted.
    rng = random.Random("A-7")
    path = make_path()
    for i in range(1000):
        source = (f"198.51.100.{rng.randrange(256)}", rng.randrange(1, 65536))
        datagram = reply((f"203.0.113.{rng.randrange(256)}", rng.randrange(1, 65536))) if i % 2 else rng.randbytes(80)
        assert path.handle(datagram, source).outcome == ReturnOutcome.REJECTED
    s = check_sums(path)
    assert s.rejected == {"source": 1000}
    assert s.tx_to_client == 0


# --- rejected: bad headers, with the decoder's reason ------------------------------------


def _with(datagram: bytes, offset: int, value: bytes) -> bytes:
    return datagram[:offset] + value + datagram[offset + len(value) :]


GOOD = reply()
_ADDR4 = GOOD[16:28]

BAD_HEADERS = [
    ("QUIC bytes, no header", PAYLOAD, "proxy_signature"),
    ("one wrong signature byte", _with(GOOD, 11, b"\x0b"), "proxy_signature"),
    ("PROXY v1 text", b"PROXY UDP4 203.0.113.9 192.0.2.10 51000 443\r\n" + PAYLOAD, "proxy_signature"),
    ("signature prefix only", GOOD[:10], "truncated"),
    ("cut in the address block", GOOD[:20], "truncated"),
    ("cut before the ports", GOOD[:25], "truncated"),
    ("length past the end", _with(GOOD[:28], 14, struct.pack(">H", 200)), "truncated"),
    ("version 1", _with(GOOD, 12, b"\x11"), "proxy_version"),
    ("version 3", _with(GOOD, 12, b"\x31"), "proxy_version"),
    ("command LOCAL", _with(GOOD, 12, b"\x20"), "proxy_local"),
    ("command 2", _with(GOOD, 12, b"\x22"), "proxy_command"),
    ("family UNSPEC", _with(GOOD, 13, b"\x00"), "proxy_family"),
    ("INET over STREAM", _with(GOOD, 13, b"\x11"), "proxy_family"),
    ("UNIX over DGRAM", _with(GOOD, 13, b"\x32"), "proxy_family"),
    ("length shorter than the INET block", _with(GOOD, 14, struct.pack(">H", 8)), "proxy_length"),
    ("INET6 family with an INET-sized length", _with(GOOD, 13, b"\x22"), "proxy_length"),
    (
        "TLV overruns the header",
        PROXY_V2_SIGNATURE + b"\x21\x12" + struct.pack(">H", 12 + 5) + _ADDR4 + b"\xe0\x00\x0aab" + PAYLOAD,
        "proxy_tlv",
    ),
    (
        "stray byte after the TLVs",
        PROXY_V2_SIGNATURE + b"\x21\x12" + struct.pack(">H", 12 + 4) + _ADDR4 + b"\xe0\x00\x00\x99" + PAYLOAD,
        "proxy_tlv",
    ),
]


@pytest.mark.parametrize(("datagram", "reason"), [c[1:] for c in BAD_HEADERS], ids=[c[0] for c in BAD_HEADERS])
def test_bad_header_is_rejected_with_its_reason(datagram: bytes, reason: str) -> None:
    path = make_path()
    decision = path.handle(datagram, BACKEND1)
    assert decision.outcome == ReturnOutcome.REJECTED
    assert decision.reason == reason
    assert decision.payload == b""
    assert check_sums(path).rejected == {reason: 1}


def test_empty_datagram_is_rejected() -> None:
    path = make_path()
    decision = path.handle(b"", BACKEND1)
    assert decision.outcome == ReturnOutcome.REJECTED
    assert decision.reason in PROXY_REASONS


@pytest.mark.parametrize(
    "vip",
    [OTHER_VIP, ("192.0.2.10", 444), ("2001:db8::11", 443), INSIDE, CLIENT],
    ids=["other-ip", "other-port", "other-v6", "inside", "client"],
)
def test_unknown_vip_is_rejected(vip: tuple[str, int]) -> None:
    path = make_path()
    client = CLIENT6 if ":" in vip[0] else CLIENT
    decision = path.handle(reply(client, vip), BACKEND1)
    assert decision.outcome == ReturnOutcome.REJECTED
    assert decision.reason == "unknown_vip"
    assert check_sums(path).rejected == {"unknown_vip": 1}


def test_client_port_zero_is_not_sent() -> None:
    path = make_path()
    assert path.handle(reply(("203.0.113.9", 0)), BACKEND1).outcome == ReturnOutcome.REJECTED
    assert check_sums(path).tx_to_client == 0


# --- health replies ----------------------------------------------------------------------
# The health checker is a client with its own socket: a probe's answer is an ordinary reply.

CHECKER = ("127.0.0.1", 40123)


def test_health_reply_returns_like_any_reply() -> None:
    nonce = bytes(range(0x30, 0x40))
    probe = build_probe(nonce)
    probe_dcid = probe[6 : 6 + probe[5]]
    vn = version_negotiation(b"", probe_dcid, [0x00000001, 0x6B3343CF])  # the backend's answer
    path = make_path()
    decision = path.handle(encode_proxy_header(CHECKER, VIP) + vn, BACKEND2)
    assert decision.outcome == ReturnOutcome.TO_CLIENT
    assert (decision.client, decision.vip, decision.payload) == (CHECKER, VIP, vn)
    assert probe_reply_nonce_untrusted(decision.payload) == nonce
    s = check_sums(path)
    assert (s.tx_to_client, s.tx_client_bytes) == (1, len(vn))


def test_health_reply_from_a_non_backend_is_rejected() -> None:
    path = make_path()
    vn = version_negotiation(b"", bytes(16), [1])
    decision = path.handle(encode_proxy_header(CHECKER, VIP) + vn, ("10.0.0.66", 4001))
    assert (decision.outcome, decision.reason) == (ReturnOutcome.REJECTED, "source")
    assert check_sums(path).tx_to_client == 0


# --- counters and reconfiguration ---------------------------------------------------------


def test_counters_add_up_over_random_traffic() -> None:
    rng = random.Random("return fuzz")
    path = make_path()
    sources = [BACKEND1, BACKEND2, BACKEND6, ("10.0.0.3", 4003), CLIENT]
    sent = 0
    for _ in range(3000):
        pick = rng.random()
        if pick < 0.4:
            datagram = reply((f"203.0.113.{rng.randrange(256)}", rng.randrange(1, 65536)), payload=rng.randbytes(60))
        elif pick < 0.5:
            datagram = encode_proxy_header(CHECKER, VIP if rng.random() < 0.5 else OTHER_VIP) + rng.randbytes(20)
        elif pick < 0.8:
            datagram = bytearray(reply(payload=rng.randbytes(30)))
            for _ in range(rng.randrange(1, 4)):
                datagram[rng.randrange(30)] = rng.randrange(256)
            datagram = bytes(datagram)[: rng.randrange(len(datagram) + 1)]
        else:
            datagram = rng.randbytes(rng.randrange(0, 100))
        decision = path.handle(datagram, rng.choice(sources))
        if decision.outcome == ReturnOutcome.TO_CLIENT:
            sent += len(decision.payload)
            assert decision.vip in (VIP, VIP6)
        elif decision.outcome == ReturnOutcome.REJECTED:
            assert decision.reason
    s = check_sums(path)
    assert s.rx_backend_datagrams == 3000
    assert s.tx_client_bytes == sent
    assert s.tx_to_client > 0 and len(s.rejected) > 2


def test_reconfigure_swaps_trust_and_keeps_counters() -> None:
    path = make_path()
    assert path.handle(reply(), BACKEND2).outcome == ReturnOutcome.TO_CLIENT
    path.reconfigure([table("a", OTHER_VIP, [BACKEND1])])
    assert path.handle(reply(), BACKEND2).reason == "source"  # removed backend
    assert path.handle(reply(), BACKEND1).reason == "unknown_vip"  # VIP no longer served
    assert path.handle(reply(vip=OTHER_VIP), BACKEND1).outcome == ReturnOutcome.TO_CLIENT
    s = check_sums(path)
    assert (s.rx_backend_datagrams, s.tx_to_client) == (4, 2)
    assert s.rejected == {"source": 1, "unknown_vip": 1}


# --- tenant isolation, client addresses, stale configurations ----------------------------


def test_a_backend_never_emits_from_another_tenants_vip() -> None:
    # Issue 13 hole 1: BACKEND6 belongs to service "b" (VIP6) only; BACKEND1 to "a" (VIP) only.
    path = make_path()
    assert path.handle(reply(CLIENT6, VIP6), BACKEND1).reason == "foreign_vip"
    assert path.handle(reply(CLIENT, VIP), BACKEND6).reason == "foreign_vip"
    assert path.handle(reply(CLIENT6, VIP6), BACKEND6).outcome == ReturnOutcome.TO_CLIENT
    s = check_sums(path)
    assert s.rejected == {"foreign_vip": 2}
    assert s.tx_to_client == 1


def test_a_backend_in_two_services_may_use_both_vips() -> None:
    shared = ("10.0.0.50", 4050)
    path = ReturnPath([table("a", VIP, [shared]), table("b", OTHER_VIP, [shared])])
    assert path.handle(reply(CLIENT, VIP), shared).outcome == ReturnOutcome.TO_CLIENT
    assert path.handle(reply(CLIENT, OTHER_VIP), shared).outcome == ReturnOutcome.TO_CLIENT


@pytest.mark.parametrize(
    ("client", "vip", "reason"),
    [
        (("0.0.0.0", 5000), VIP, "client_unspecified"),
        (("::", 5000), VIP6, "client_unspecified"),
        (("224.0.0.1", 5000), VIP, "client_multicast"),
        (("239.255.255.250", 1900), VIP, "client_multicast"),
        (("ff02::1", 5000), VIP6, "client_multicast"),
        (("255.255.255.255", 5000), VIP, "client_broadcast"),
        (VIP, VIP, "client_own_address"),  # would re-enter the router as a client datagram
        (INSIDE, VIP, "client_own_address"),
        (VIP6, VIP6, "client_own_address"),
    ],
    ids=repr,
)
def test_replies_never_go_to_unspecified_multicast_broadcast_or_own_addresses(
    client: Address, vip: Address, reason: str
) -> None:
    path = make_path()
    source = BACKEND6 if ":" in vip[0] else BACKEND1
    decision = path.handle(reply(client, vip), source)
    assert (decision.outcome, decision.reason) == (ReturnOutcome.REJECTED, reason)
    assert check_sums(path).rejected == {reason: 1}


def test_a_client_on_the_vips_host_but_another_port_is_served() -> None:
    # One-host deployments: clients share the VIP's IP (loopback); only the exact sockets are refused.
    path = make_path()
    assert path.handle(reply(("192.0.2.10", 40000), VIP), BACKEND1).outcome == ReturnOutcome.TO_CLIENT


def _handshake_reply(scid: bytes) -> bytes:
    # A long-header (Initial-type) reply: first octet 0xc0, version 1, DCID, SCID, then padding.
    dcid = bytes(8)
    return b"\xc0\x00\x00\x00\x01" + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid + bytes(40)


def test_stale_configuration_is_flagged_and_cleared() -> None:
    # backend 0001 of service "a" answers a handshake with an SCID from a key the LB lacks.
    path = make_path()
    flips: list[tuple[str, str, bool]] = []
    path.on_stale_change = lambda service, label, stale: flips.append((service, label, stale))
    other_key = CidConfig(config_id=0, server_id_len=2, nonce_len=6, key=bytes(range(1, 17)))
    stale = encode_cid(other_key, server_id=b"\x00\x01", nonce=bytes(6))
    good = encode_cid(CFG, server_id=b"\x00\x01", nonce=bytes(6))
    assert path.handle(encode_proxy_header(CLIENT, VIP) + _handshake_reply(stale), BACKEND1).outcome == (
        ReturnOutcome.TO_CLIENT  # still delivered: the alarm is for the operator
    )
    s = path.stats()
    assert s.stale_config == {("a", "0001"): True}
    assert s.stale_cid_replies == {("a", "0001"): 1}
    path.handle(encode_proxy_header(CLIENT, VIP) + _handshake_reply(good), BACKEND1)
    assert path.stats().stale_config == {("a", "0001"): False}
    # Another backend's SCID is stale for this sender too: it would route elsewhere.
    other_backend = encode_cid(CFG, server_id=b"\x00\x02", nonce=bytes(6))
    path.handle(encode_proxy_header(CLIENT, VIP) + _handshake_reply(other_backend), BACKEND1)
    assert path.stats().stale_config == {("a", "0001"): True}
    assert flips == [("a", "0001", True), ("a", "0001", False), ("a", "0001", True)]
    # Short headers and VN answers are never inspected.
    path.handle(encode_proxy_header(CLIENT, VIP) + PAYLOAD, BACKEND1)
    assert path.stats().stale_cid_replies == {("a", "0001"): 2}
