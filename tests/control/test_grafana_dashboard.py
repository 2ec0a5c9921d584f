"""deploy/grafana/quiclb.json queries only what the LB and the backends export (issue 11)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.metrics import render_prometheus
from backends.stats import BackendStats
from lb.control.metrics import render_metrics
from lb.control.snapshot import LbSnapshot
from lb.core.return_path import ReturnStats

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "quiclb.json"
FAMILIES_FILE = Path(__file__).with_name("exposition_families.json")
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
#: PromQL words that look like identifiers but are not metric names.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, for every family the LB and a backend expose today."""
    snap = LbSnapshot(
        routers=(), return_path=ReturnStats(0, 0, 0, {}), services=(), backends=(), config_path="x",
        config_version=1, config_digest="d", config_reloads=0, config_rejected=0, last_reload_error=None,
        fallback_table_builds=0, started_at=0.0, pid=1,
        extra={"tx_to_client_errors": 0},  # the app always reports this adapter counter
    )
    pinned = json.loads(FAMILIES_FILE.read_text())
    pinned_labels = {name: set(shape["labels"]) for side in pinned.values() for name, shape in side.items()}
    samples: dict[str, set[str]] = {}
    texts = (render_metrics(snap, admin_auth_failures=0), render_prometheus(BackendStats(), server_id="0001",
                                                                             service="echo"))
    for text in texts:
        for family in text_string_to_metric_families(text):
            # Families with no sample yet (no traffic) still count; their labels come from the pinned shapes.
            sample_name = family.name + ("_total" if family.type == "counter" else "")
            labels = set(pinned_labels.get(family.name, set()))
            for sample in family.samples:
                labels |= set(sample.labels)
            samples[sample_name] = labels
    return samples


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(panel title, expression, legend) of every panel target and template variable query."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
        for panel in panels:
            yield from walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"], target.get("legendFormat", "")

    yield from walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield "$" + variable["name"], query["query"] if isinstance(query, dict) else query, ""


def parse_promql(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses; enough PromQL for a dashboard's queries.

    A ``__name__=~"regex"`` matcher is returned as the metric name ``~regex``.
    """
    labels: set[str] = set()
    metrics = {"~" + regex for regex in re.findall(r'__name__\s*=~\s*"([^"]*)"', expr)}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and strings
    for metric, label in re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)", text):
        metrics.add(metric)
        labels.add(label)
    text = re.sub(r"label_values\([^)]*\)", " ", text)
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers)) - {"__name__"}
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        labels |= {g.strip() for g in grouping.split(",") if g.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    for match in re.finditer(r"[a-zA-Z_:][\w:]*", text):
        word = match.group(0)
        followed_by_call = text[match.end() :].lstrip().startswith("(")
        if followed_by_call or word.lower() in PROMQL_WORDS:
            continue
        metrics.add(word)
    return metrics, labels


def test_parse_promql_sees_metrics_and_labels() -> None:
    metrics, labels = parse_promql(
        'sum by (service, reason) (rate(quiclb_x_total{service=~"$service", a!="b"}[$__rate_interval])) * 8'
        " - max(quiclb_y)"
    )
    assert metrics == {"quiclb_x_total", "quiclb_y"}
    assert labels == {"service", "reason", "a"}
    assert parse_promql("label_values(quiclb_z, service)") == ({"quiclb_z"}, {"service"})


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_every_query_names_exported_families_and_labels(dashboard: dict[str, Any]) -> None:
    families = exported()
    seen = 0
    for title, expr, legend in queries(dashboard):
        metrics, labels = parse_promql(expr)
        assert metrics, f"{title}: {expr!r} names no metric"
        for pattern in [m for m in metrics if m.startswith("~")]:  # a regex must match something exported
            metrics.remove(pattern)
            matched = {name for name in families if re.fullmatch(pattern[1:], name)}
            assert matched, f"{title}: {pattern[1:]!r} matches no exported family"
            metrics |= matched
        unknown = metrics - set(families)
        assert not unknown, f"{title}: {expr!r} names {sorted(unknown)}, which nothing exports"
        available = set().union(*(families[m] for m in metrics)) | TARGET_LABELS | {"__name__"}
        assert labels <= available, f"{title}: {expr!r} uses labels {sorted(labels - available)}"
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        assert legend_labels <= available, f"{title}: legend {legend!r}"
        seen += 1
    assert seen >= 20


def test_the_dashboard_covers_every_family(dashboard: dict[str, Any]) -> None:
    """A family nobody graphs is a family nobody watches (adapter counters, named at run time, by a regex)."""
    used: set[str] = set()
    for _, expr, _ in queries(dashboard):
        used |= parse_promql(expr)[0]
    patterns = [m[1:] for m in used if m.startswith("~")]
    missing = {name for name in exported() if not any(re.fullmatch(p, name) for p in patterns)} - used
    assert not missing, sorted(missing)


def test_panels_have_unique_ids_and_a_prometheus_datasource(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
