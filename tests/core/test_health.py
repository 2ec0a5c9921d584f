"""Health checks by Version Negotiation probes (sans-IO): tracker rules, probe and reply codecs."""

from __future__ import annotations

import pytest

from lb import CidConfig
from lb.core.health import HealthTracker, build_probe, probe_reply_nonce_untrusted
from lb.core.outcomes import Outcome
from lb.core.quic_constants import is_reserved_version
from lb.core.quic_header import parse_routing_fields_untrusted
from lb.core.router import Router
from lb.core.service_table import Backend, build_service_table
from quiclb_harness.datagrams import initial, short_header, version_negotiation, vn_probe

INTERVAL, TIMEOUT, THRESHOLD = 1.0, 0.5, 3


class Nonces:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> bytes:
        self.n += 1
        return self.n.to_bytes(16, "big")


def tracker(keys: tuple[str, ...] = ("a", "b")) -> tuple[HealthTracker, Nonces]:
    t = HealthTracker(INTERVAL, TIMEOUT, THRESHOLD)
    t.set_targets(keys)
    return t, Nonces()


def probe_round(t: HealthTracker, nonces: Nonces, now: float, answer: set[str]) -> list[object]:
    """Send due probes at ``now``, answer those of ``answer`` at once, expire the rest at now + timeout."""
    sent = dict(t.due(now, nonces))
    for key in answer & set(sent):
        assert t.on_reply(sent[key], now + 0.01) is not None
    return t.expire(now + TIMEOUT)


def test_backends_start_healthy() -> None:
    t, _ = tracker()
    assert t.is_healthy("a") and t.is_healthy("b")
    assert t.is_healthy("never configured")


def test_threshold_consecutive_misses_mark_down() -> None:
    t, nonces = tracker()
    changes = []
    for i in range(THRESHOLD):
        assert t.is_healthy("a"), f"down after only {i} misses"
        changes.append(probe_round(t, nonces, i * INTERVAL, answer={"b"}))
    assert changes[:-1] == [[]] * (THRESHOLD - 1)
    assert changes[-1] == ["a"]
    assert not t.is_healthy("a")
    assert t.is_healthy("b")
    status = t.status("a")
    assert status is not None and status.consecutive_misses == THRESHOLD and not status.healthy
    # Further misses report no new change.
    assert probe_round(t, nonces, THRESHOLD * INTERVAL, answer={"b"}) == []


def test_one_reply_marks_up() -> None:
    t, nonces = tracker()
    for i in range(THRESHOLD + 2):
        probe_round(t, nonces, i * INTERVAL, answer=set())
    assert not t.is_healthy("a")
    now = (THRESHOLD + 2) * INTERVAL
    sent = dict(t.due(now, nonces))
    assert t.on_reply(sent["a"], now + 0.1) == ("a", True)
    assert t.is_healthy("a")
    status = t.status("a")
    assert status is not None and status.consecutive_misses == 0
    assert status.last_rtt == pytest.approx(0.1)
    assert t.on_reply(sent["b"], now + 0.1) == ("b", True)


def test_misses_must_be_consecutive() -> None:
    t, nonces = tracker(("a",))
    pattern = [False, False, True, False, False, True, False, False]  # never THRESHOLD in a row
    for i, answered in enumerate(pattern):
        assert probe_round(t, nonces, i * INTERVAL, answer={"a"} if answered else set()) == []
    assert t.is_healthy("a")


def test_reply_to_a_healthy_backend_reports_no_change() -> None:
    t, nonces = tracker(("a",))
    ((_, nonce),) = t.due(0.0, nonces)
    assert t.on_reply(nonce, 0.05) == ("a", False)


def test_unknown_stale_and_duplicate_nonces_are_ignored() -> None:
    t, nonces = tracker(("a",))
    assert t.on_reply(b"\x00" * 16, 0.0) is None
    ((_, nonce),) = t.due(0.0, nonces)
    assert t.on_reply(b"not ours", 0.1) is None
    assert t.on_reply(nonce, 0.1) == ("a", False)
    assert t.on_reply(nonce, 0.2) is None  # a duplicate
    # A late answer to an expired probe does not count: the miss stands.
    ((_, late),) = t.due(1.0, nonces)
    assert t.expire(1.0 + TIMEOUT) == []
    assert t.on_reply(late, 1.0 + TIMEOUT + 0.1) is None
    status = t.status("a")
    assert status is not None and status.consecutive_misses == 1 and status.replies == 1


def test_one_probe_per_interval_and_none_while_pending() -> None:
    t, nonces = tracker(("a",))
    assert len(t.due(0.0, nonces)) == 1
    assert t.due(0.1, nonces) == []  # pending
    t.expire(TIMEOUT)
    assert t.due(TIMEOUT + 0.01, nonces) == []  # not yet an interval since the last probe
    assert len(t.due(INTERVAL, nonces)) == 1
    assert t.next_wakeup(INTERVAL) == pytest.approx(INTERVAL + TIMEOUT)


def test_set_targets_keeps_state() -> None:
    t, nonces = tracker(("a", "b"))
    for i in range(THRESHOLD):
        probe_round(t, nonces, i * INTERVAL, answer={"b"})
    assert not t.is_healthy("a")
    sent = dict(t.due(THRESHOLD * INTERVAL, nonces))
    t.set_targets(["a", "c"])
    assert not t.is_healthy("a")  # kept: a reload does not resurrect a dead backend
    assert t.is_healthy("c")  # new: starts healthy
    assert t.status("b") is None  # forgotten
    assert t.on_reply(sent["b"], THRESHOLD * INTERVAL + 0.1) is None  # and its pending probe with it
    assert t.on_reply(sent["a"], THRESHOLD * INTERVAL + 0.1) == ("a", True)


@pytest.mark.parametrize(("interval", "timeout", "threshold"), [(0, 1, 1), (1, 0, 1), (1, 1, 0), (-1, 1, 3)])
def test_bad_parameters_are_refused(interval: float, timeout: float, threshold: int) -> None:
    with pytest.raises(ValueError):
        HealthTracker(interval, timeout, threshold)


# --- the probe and its reply ------------------------------------------------------------------


@pytest.mark.parametrize("nonce", [bytes(range(16)), b"\xff" * 8, bytes(range(20))], ids=["16", "8", "20"])
def test_build_probe_is_a_full_size_greased_long_header(nonce: bytes) -> None:
    probe = build_probe(nonce)
    assert len(probe) == 1200  # RFC 9000 §5.2.2: smaller unknown-version datagrams get no VN
    fields = parse_routing_fields_untrusted(probe)
    assert fields.is_long
    assert fields.version is not None and is_reserved_version(fields.version)
    assert fields.dcid == nonce
    assert fields.scid == b""


def test_probe_is_forwarded_by_a_router_not_dropped() -> None:
    # The probe travels like client traffic; the router's small-unknown-version rule must not eat it.
    cfg = CidConfig(config_id=0, server_id_len=1, nonce_len=15, key=bytes(16))
    tbl = build_service_table(
        name="svc", vip=("192.0.2.10", 443), cid_configs=[cfg],
        backends=[Backend(b"\x01", ("10.0.0.1", 4001))], fallback_key=b"k" * 16, maglev_size=1009,
    )
    outcome, backend = Router(tbl).route(build_probe(bytes(16)), ("127.0.0.1", 4434))
    assert outcome == Outcome.FALLBACK_UNKNOWN_VERSION
    assert backend is not None


@pytest.mark.parametrize("nonce", [bytes(range(16)), b"\x01" * 8, b"\xee" * 20])
def test_reply_nonce_from_a_version_negotiation(nonce: bytes) -> None:
    probe = build_probe(nonce)
    fields = parse_routing_fields_untrusted(probe)
    # RFC 8999 §6: the VN echoes the probe's SCID as DCID and its DCID as SCID.
    vn = version_negotiation(fields.scid or b"", fields.dcid, [0x00000001, 0x6B3343CF])
    assert probe_reply_nonce_untrusted(vn) == nonce
    assert probe_reply_nonce_untrusted(version_negotiation(b"\x01" * 8, nonce, [1], first_byte=0x80)) == nonce


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"\xc0",
        b"\xc0" + bytes(4),
        version_negotiation(b"\x01" * 8, b"", [1]),  # no SCID: nothing to match
        version_negotiation(b"", bytes(16), [1])[:12],  # truncated
        initial(0x00000001, bytes(16), bytes(16)),  # not a VN
        vn_probe(bytes(16)),  # a probe, not its answer
        short_header(bytes(16)),
        b"\x00" * 40,
    ],
    ids=["empty", "1-byte", "5-byte", "vn-no-scid", "vn-truncated", "initial", "probe", "short", "zeros"],
)
def test_non_replies_give_no_nonce(datagram: bytes) -> None:
    assert probe_reply_nonce_untrusted(datagram) is None
