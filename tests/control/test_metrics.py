"""Prometheus rendering of LB snapshots (acceptance.md §4, S-2, S-3)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from lb import CidConfig, encode_cid, unroutable_cid
from lb.control.metrics import (
    BACKEND_STATES,
    CONTENT_TYPE,
    COUNTER,
    METRICS,
    OUTCOME_METRICS,
    LbCollector,
    encode_metrics,
    lb_registry,
    read_process_stats,
    render_metrics,
)
from lb.control.snapshot import BackendView, LbSnapshot, ServiceView
from lb.core.lb_replies import RetryPolicy
from lb.core.outcomes import Outcome, RouterStats
from lb.core.quic_constants import GREASE_VERSION, QUIC_V1
from lb.core.rate_limit import REPLIES_PER_SOURCE
from lb.core.retry_token import TokenKey
from lb.core.return_path import ReturnStats
from lb.core.router import Router
from lb.core.service_table import Backend, build_service_table
from quiclb_harness.datagrams import initial, long_header, short_header, version_negotiation

KEY = bytes.fromhex("fdf726a9893ec05c0632d3956680baf0")
FALLBACK_KEY = bytes.fromhex("0123456789abcdef0123456789abcdef")
ENCRYPTED = CidConfig(config_id=0, server_id_len=2, nonce_len=6, key=KEY)
PLAIN = CidConfig(config_id=1, server_id_len=2, nonce_len=6)
SID_A, SID_B, SID_GONE, SID_NONE = b"\x00\x01", b"\x00\x02", b"\x00\x09", b"\x00\x05"
CLIENT = ("192.0.2.7", 50000)
MAGLEV_SIZE = 257

Series = dict[str, list[tuple[dict[str, str], float]]]


def _nonce(i: int) -> bytes:
    return i.to_bytes(6, "big")


def _routers() -> list[Router]:
    """Three services whose traffic, together, produces every Outcome at least once."""
    backends = [Backend(SID_A, ("127.0.0.1", 4001)), Backend(SID_B, ("127.0.0.1", 4002), draining=True)]
    echo = Router(
        build_service_table(
            name="echo",
            vip=("127.0.0.1", 4433),
            cid_configs=[ENCRYPTED],
            backends=backends,
            fallback_key=FALLBACK_KEY,
            tombstones=[SID_GONE],
            maglev_size=MAGLEV_SIZE,
        )
    )
    for _ in range(3):  # the 2nd and 3rd hit the decode cache
        echo.route(short_header(encode_cid(ENCRYPTED, SID_A, _nonce(1))), CLIENT)
    echo.route(short_header(encode_cid(ENCRYPTED, SID_B, _nonce(2))), CLIENT)  # draining: still CID-routed
    echo.route(initial(QUIC_V1, unroutable_cid(8), b"\x01" * 8), CLIENT)  # FALLBACK_INITIAL
    echo.route(initial(QUIC_V1, encode_cid(ENCRYPTED, SID_NONE, _nonce(3)), b""), CLIENT)  # FALLBACK_UNKNOWN_SID
    echo.route(initial(GREASE_VERSION, unroutable_cid(8), b""), CLIENT)  # FALLBACK_UNKNOWN_VERSION
    echo.route(short_header(encode_cid(ENCRYPTED, SID_NONE, _nonce(4))), CLIENT)  # UNKNOWN_SID_DROPPED
    echo.route(short_header(encode_cid(ENCRYPTED, SID_GONE, _nonce(5))), CLIENT)  # REMOVED_BACKEND_DROPPED
    echo.route(short_header(unroutable_cid(9)), CLIENT)  # UNROUTABLE_DROPPED
    echo.route(b"", CLIENT)  # MALFORMED (empty)
    echo.route(b"\x01" + bytes(20), CLIENT)  # MALFORMED (fixed bit)
    echo.route(version_negotiation(b"\x01" * 8, b"\x02" * 8, [QUIC_V1]), CLIENT)  # VN_DROPPED
    echo.route(long_header(GREASE_VERSION, b"\x01" * 8, b""), CLIENT)  # SMALL_UNKNOWN_VERSION_DROPPED

    # Plaintext configuration (linkable), every backend draining: fallback has nowhere to go.
    web = Router(
        build_service_table(
            name="web",
            vip=("127.0.0.1", 8443),
            cid_configs=[PLAIN],
            backends=[Backend(SID_A, ("127.0.0.1", 5001), draining=True)],
            fallback_key=FALLBACK_KEY,
            maglev_size=MAGLEV_SIZE,
        )
    )
    web.route(short_header(encode_cid(PLAIN, SID_A, _nonce(6))), CLIENT)  # CID_ROUTED, config 1
    web.route(initial(QUIC_V1, unroutable_cid(8), b""), CLIENT)  # NO_BACKEND_DROPPED

    # The short-header fallback switch.
    legacy = Router(
        build_service_table(
            name="legacy",
            vip=("127.0.0.1", 9443),
            cid_configs=[ENCRYPTED],
            backends=[Backend(SID_A, ("127.0.0.1", 6001))],
            fallback_key=FALLBACK_KEY,
            maglev_size=MAGLEV_SIZE,
            short_header_fallback=True,
        )
    )
    legacy.route(short_header(unroutable_cid(9)), CLIENT)  # FALLBACK_NO_CONFIG
    legacy.route(short_header(encode_cid(ENCRYPTED, SID_NONE, _nonce(7))), CLIENT)  # FALLBACK_SHORT_UNKNOWN_SID

    # Retry offload and stateless resets (issue 9).
    guarded = Router(
        build_service_table(
            name="guarded",
            vip=("127.0.0.1", 7443),
            cid_configs=[ENCRYPTED],
            backends=[Backend(SID_A, ("127.0.0.1", 7001))],
            fallback_key=FALLBACK_KEY,
            tombstones=[SID_GONE],
            maglev_size=MAGLEV_SIZE,
            retry=RetryPolicy("always", TokenKey.from_secret(bytes(16)), 2000, ENCRYPTED),
            reset_key=bytes(range(16)),
        ),
        clock=lambda: 1_700_000_000.0,
    )
    for n in range(REPLIES_PER_SOURCE + 1):  # RETRY_SENT x 10, then RETRY_RATE_LIMITED
        guarded.route(initial(QUIC_V1, unroutable_cid(8), bytes([n]) * 8), ("127.0.0.9", 1000 + n))
    guarded.route(initial(QUIC_V1, unroutable_cid(8), b"", token=bytes(60)), CLIENT)  # TOKEN_REJECTED
    guarded.route(short_header(encode_cid(ENCRYPTED, SID_GONE, _nonce(8))), CLIENT)  # RESET_SENT
    guarded.replies.take()
    return [echo, web, legacy, guarded]


def _view(service: str, sid: bytes, state: str, healthy: bool, **counters: int) -> BackendView:
    return BackendView(
        service=service,
        server_id=sid.hex(),
        address=f"127.0.0.1:{4000 + sid[-1]}",
        state=state,
        healthy=healthy,
        in_fallback=state == "active" and healthy,
        tx_datagrams=counters.get("tx", 0),
        unreachable=counters.get("unreachable", 0),
        probes=counters.get("probes", 0),
        probe_replies=counters.get("replies", 0),
        last_probe_rtt=0.00025 if healthy else None,
    )


def _snapshot(routers: tuple[RouterStats, ...] | None = None, **overrides: object) -> LbSnapshot:
    fields: dict[str, object] = {
        "routers": tuple(r.stats() for r in _routers()) if routers is None else routers,
        "return_path": ReturnStats(
            rx_backend_datagrams=12,
            tx_to_client=9,
            tx_client_bytes=9000,
            rejected={"source": 2, "unknown_vip": 1},
        ),
        "services": (
            ServiceView("echo", "127.0.0.1:4433", (0,), linkable=False, fallback_backends=1),
            ServiceView("web", "127.0.0.1:8443", (1,), linkable=True, fallback_backends=0),
            ServiceView("legacy", "127.0.0.1:9443", (0,), linkable=False, fallback_backends=1),
        ),
        "backends": (
            _view("echo", SID_A, "active", True, tx=5, probes=10, replies=9),
            _view("echo", SID_B, "draining", True, tx=1),
            _view("echo", SID_GONE, "removed", False),
            _view("legacy", SID_A, "active", False, unreachable=3, probes=4),
        ),
        "config_path": "/etc/quiclb/lb.toml",
        "config_version": 7,
        "config_digest": "sha256:" + "ab" * 32,
        "config_reloads": 3,
        "config_rejected": 1,
        "last_reload_error": None,
        "fallback_table_builds": 5,
        "started_at": 1_700_000_000.5,
        "pid": 4242,
        "extra": {"send_errors": 2},
    }
    fields.update(overrides)
    return LbSnapshot(**fields)  # type: ignore[arg-type]


_TYPE_LINE = re.compile(r"# TYPE (\S+) (counter|gauge)")
_HELP_LINE = re.compile(r"# HELP (\S+) .+")
_NAME = re.compile(r"quiclb_[a-z0-9_]+")


def _parse(text: str) -> Series:
    """Check the exposition strictly, then parse it with prometheus_client."""
    assert text.endswith("\n")
    seen_families: set[str] = set()
    current: str | None = None
    helped: str | None = None
    for line in text.splitlines():
        if line.startswith("# HELP"):
            m = _HELP_LINE.fullmatch(line)
            assert m, line
            helped = m.group(1)
            continue
        if line.startswith("# TYPE"):
            m = _TYPE_LINE.fullmatch(line)
            assert m, line
            current, kind = m.group(1), m.group(2)
            assert helped == current, f"TYPE without HELP: {line}"
            assert current not in seen_families, f"family repeated: {current}"
            assert _NAME.fullmatch(current), current
            assert current.endswith("_total") == (kind == "counter"), line
            seen_families.add(current)
            continue
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        assert name == current, f"sample outside its family: {line}"

    series: Series = defaultdict(list)
    keys: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in keys, f"duplicate series {key}"
            keys.add(key)
            series[sample.name].append((dict(sample.labels), sample.value))
    return series


def _total(series: Series, name: str, **labels: str) -> float:
    return sum(v for lab, v in series.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def _value(series: Series, name: str, **labels: str) -> float:
    matches = [v for lab, v in series.get(name, []) if lab == labels]
    assert len(matches) == 1, (name, labels, series.get(name))
    return matches[0]


@pytest.fixture(scope="module")
def stats() -> tuple[RouterStats, ...]:
    return tuple(r.stats() for r in _routers())


@pytest.fixture(scope="module")
def series(stats: tuple[RouterStats, ...]) -> Series:
    return _parse(render_metrics(_snapshot(stats), admin_auth_failures=4))


def test_fixture_traffic_reaches_every_outcome(stats: tuple[RouterStats, ...]) -> None:
    seen = {o for s in stats for o, n in s.outcomes.items() if n}
    assert seen == set(Outcome)


def test_every_outcome_maps_to_one_declared_counter() -> None:
    assert set(OUTCOME_METRICS) == set(Outcome)
    for name in OUTCOME_METRICS.values():
        assert METRICS[name][0] == COUNTER
    # Fallback outcomes, and only they, share the labelled fallback_routed family.
    for outcome, name in OUTCOME_METRICS.items():
        assert (name == "fallback_routed") == (outcome.fallback_reason is not None)


def test_outcome_counters_sum_to_received_datagrams(stats: tuple[RouterStats, ...], series: Series) -> None:
    outcome_families = {f"quiclb_{name}_total" for name in OUTCOME_METRICS.values()}
    # Every *_dropped family is an outcome: a drop counter outside the table would break the invariant.
    assert {n for n in series if n.endswith("_dropped_total")} <= outcome_families
    for s in stats:
        rx = _value(series, "quiclb_rx_client_datagrams_total", service=s.service)
        assert rx == s.rx_client_datagrams > 0
        outcomes = sum(_total(series, fam, service=s.service) for fam in outcome_families)
        assert outcomes == rx, s.service
        assert s.total_outcomes() == s.rx_client_datagrams


def test_outcome_counters_by_label(stats: tuple[RouterStats, ...], series: Series) -> None:
    echo = next(s for s in stats if s.service == "echo")
    assert _value(series, "quiclb_cid_routed_total", service="echo", config="0", backend=SID_A.hex()) == 3
    assert _value(series, "quiclb_cid_routed_total", service="echo", config="0", backend=SID_B.hex()) == 1
    assert _value(series, "quiclb_cid_routed_total", service="web", config="1", backend=SID_A.hex()) == 1
    for outcome in Outcome:
        reason = outcome.fallback_reason
        if reason is not None:
            for svc in ("echo", "web", "legacy"):  # every reason has a series, zero included
                _value(series, "quiclb_fallback_routed_total", service=svc, reason=reason)
            assert _value(series, "quiclb_fallback_routed_total", service="echo", reason=reason) == echo.outcomes[
                outcome
            ]
    assert _value(series, "quiclb_malformed_dropped_total", service="echo", reason="empty") == 1
    assert _value(series, "quiclb_malformed_dropped_total", service="echo", reason="fixed_bit") == 1
    for name in ("unknown_sid", "removed_backend", "unroutable", "vn", "small_unknown_version"):
        assert _value(series, f"quiclb_{name}_dropped_total", service="echo") == 1
    assert _value(series, "quiclb_no_backend_dropped_total", service="web") == 1
    assert _value(series, "quiclb_cipher_calls_total", service="echo") == echo.cipher_calls > 0
    assert _value(series, "quiclb_decode_cache_entries", service="echo") == echo.cache_entries
    assert _value(series, "quiclb_decode_cache_evictions_total", service="echo") == 0


def test_return_path_counters(series: Series) -> None:
    assert _value(series, "quiclb_rx_backend_datagrams_total") == 12
    assert _value(series, "quiclb_tx_to_client_total") == 9
    assert _value(series, "quiclb_tx_client_bytes_total") == 9000
    assert _value(series, "quiclb_return_rejected_total", reason="source") == 2
    assert _value(series, "quiclb_return_rejected_total", reason="unknown_vip") == 1
    # The return path's own invariant: every inside datagram is sent or rejected.
    assert _total(series, "quiclb_return_rejected_total") + 9 == 12


def test_backend_series(series: Series) -> None:
    a = {"service": "echo", "backend": SID_A.hex()}
    assert _value(series, "quiclb_tx_to_backend_total", **a) == 5
    assert _value(series, "quiclb_health_probes_total", **a) == 10
    assert _value(series, "quiclb_health_probe_replies_total", **a) == 9
    assert _value(series, "quiclb_backend_healthy", **a) == 1
    assert _value(series, "quiclb_backend_info", **a, address="127.0.0.1:4001") == 1
    assert _value(series, "quiclb_health_probe_rtt_seconds", **a) == pytest.approx(0.00025)
    assert _value(series, "quiclb_backend_unreachable_total", service="legacy", backend=SID_A.hex()) == 3
    expected = {
        ("echo", SID_A.hex()): "up",
        ("echo", SID_B.hex()): "draining",
        ("echo", SID_GONE.hex()): "removed",
        ("legacy", SID_A.hex()): "down",
    }
    for (svc, sid), state in expected.items():
        values = {
            s: _value(series, "quiclb_backend_state", service=svc, backend=sid, state=s) for s in BACKEND_STATES
        }
        assert values == {s: int(s == state) for s in BACKEND_STATES}


def test_service_linkable_and_config_identity(series: Series) -> None:
    assert _value(series, "quiclb_service_linkable", service="web") == 1
    assert _value(series, "quiclb_service_linkable", service="echo") == 0
    assert _value(series, "quiclb_config_version") == 7
    assert _value(series, "quiclb_config_info", digest="sha256:" + "ab" * 32) == 1
    assert _value(series, "quiclb_config_reloads_total") == 3
    assert _value(series, "quiclb_config_rejected_total") == 1
    assert _value(series, "quiclb_config_last_reload_failed") == 0
    assert _value(series, "quiclb_fallback_table_builds_total") == 5
    assert _value(series, "quiclb_process_start_time_seconds") == 1_700_000_000.5
    assert _value(series, "quiclb_admin_auth_failures_total") == 4
    assert _value(series, "quiclb_adapter_send_errors_total") == 2


def test_process_metrics(stats: tuple[RouterStats, ...], tmp_path: Path) -> None:
    with_proc = _parse(render_metrics(_snapshot(stats)))
    without = _parse(render_metrics(_snapshot(stats), process=False))
    assert "quiclb_process_rss_bytes" not in without
    assert "quiclb_process_open_fds" not in without
    if Path("/proc/self/statm").exists():
        assert _value(with_proc, "quiclb_process_rss_bytes") > 0
        assert _value(with_proc, "quiclb_process_open_fds") > 0
    assert read_process_stats(tmp_path / "absent") == {}


def test_duplicate_routers_of_one_service_are_summed(stats: tuple[RouterStats, ...]) -> None:
    doubled = _parse(render_metrics(_snapshot(stats + stats), process=False))
    single = _parse(render_metrics(_snapshot(stats), process=False))
    assert _value(doubled, "quiclb_rx_client_datagrams_total", service="echo") == 2 * _value(
        single, "quiclb_rx_client_datagrams_total", service="echo"
    )


def test_label_values_are_escaped(stats: tuple[RouterStats, ...]) -> None:
    weird = 'a"b\\c\nd'
    snap = _snapshot(
        stats,
        services=(ServiceView(weird, "127.0.0.1:1", (0,), linkable=True, fallback_backends=0),),
        config_digest='x"y',
    )
    series = _parse(render_metrics(snap, process=False))
    assert _value(series, "quiclb_service_linkable", service=weird) == 1
    assert _value(series, "quiclb_config_info", digest='x"y') == 1


def test_reload_failure_gauge(stats: tuple[RouterStats, ...]) -> None:
    series = _parse(render_metrics(_snapshot(stats, last_reload_error="bad config"), process=False))
    assert _value(series, "quiclb_config_last_reload_failed") == 1


def test_no_key_material(stats: tuple[RouterStats, ...]) -> None:
    text = render_metrics(_snapshot(stats))
    for key in (KEY, FALLBACK_KEY):
        for form in (key.hex(), key.hex().upper(), ":".join(f"{b:02x}" for b in key)):
            assert form not in text
    # The only long hex string in the output is the configuration digest.
    assert set(re.findall(r"[0-9a-fA-F]{32,}", text)) == {"ab" * 32}


def test_content_type() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


# -- prometheus-client exposition -----------------------------------------------------------

#: Family names, types and label names captured from the hand-written exposition this module
#: replaced: dashboards and alerts rely on them, so they may grow but never change.
FAMILIES_FILE = Path(__file__).with_name("exposition_families.json")


def family_shapes(families: object) -> dict[str, dict[str, object]]:
    """``{family: {"type": ..., "labels": [sorted label names]}}`` of parsed families."""
    shapes: dict[str, dict[str, object]] = {}
    for family in families:  # type: ignore[attr-defined]
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels)
        shapes[family.name] = {"type": family.type, "labels": sorted(labels)}
    return shapes


def test_families_and_labels_are_those_of_the_hand_written_exposition(stats: tuple[RouterStats, ...]) -> None:
    before = json.loads(FAMILIES_FILE.read_text())["lb"]
    after = family_shapes(text_string_to_metric_families(render_metrics(_snapshot(stats), admin_auth_failures=4)))
    # Extend, never rename: every pinned family keeps its type and label names; new families may appear.
    assert {name: after.get(name) for name in before} == before


def test_openmetrics_by_content_negotiation(stats: tuple[RouterStats, ...]) -> None:
    registry = lb_registry(LbCollector(lambda: _snapshot(stats), admin_auth_failures=lambda: 4))
    plain, plain_type = encode_metrics(registry, None)
    assert plain_type == CONTENT_TYPE
    om, om_type = encode_metrics(registry, "application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert om_type.startswith("application/openmetrics-text; version=1.0.0")
    assert om.endswith(b"# EOF\n")
    text_families = family_shapes(text_string_to_metric_families(plain.decode()))
    om_families = family_shapes(parse_openmetrics(om.decode()))
    assert om_families == text_families
    assert encode_metrics(registry, "text/html")[1] == CONTENT_TYPE  # anything else: the classic format


def test_the_collector_reads_a_fresh_snapshot_per_scrape(stats: tuple[RouterStats, ...]) -> None:
    versions = iter(range(1, 100))
    calls: list[int] = []

    def snapshot() -> LbSnapshot:
        calls.append(1)
        return _snapshot(stats, config_version=next(versions))

    registry = lb_registry(LbCollector(snapshot, process=False))
    assert calls == []  # registering takes no snapshot: nothing runs until a scrape
    for expected in (1, 2):
        series = _parse(encode_metrics(registry, None)[0].decode())
        assert _value(series, "quiclb_config_version") == expected
    assert len(calls) == 2
