"""The backend's /metrics through prometheus-client and aiohttp: names pinned, both formats, bounded clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

import backends.metrics as backend_metrics
from backends.metrics import PROMETHEUS_CONTENT_TYPE, MetricsServer, render_prometheus
from backends.stats import BackendStats

FAMILIES_FILE = Path(__file__).parents[1] / "control" / "exposition_families.json"
WAIT = 5.0


def _stats() -> BackendStats:
    stats = BackendStats(datagrams_in=4, datagrams_out=3, connections_open=1, connections_total=2)
    stats.reject("source")
    stats.issued_cids["0"] = 9
    return stats


def _shapes(families: Any) -> dict[str, dict[str, object]]:
    shapes: dict[str, dict[str, object]] = {}
    for family in families:
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels)
        shapes[family.name] = {"type": family.type, "labels": sorted(labels)}
    return shapes


def test_families_and_labels_are_those_of_the_hand_written_exposition() -> None:
    before = json.loads(FAMILIES_FILE.read_text())["backend"]
    text = render_prometheus(_stats(), server_id="0001", service="echo")
    after = _shapes(text_string_to_metric_families(text))
    assert {name: after.get(name) for name in before} == before  # new families may appear, none may change


async def _get(address: tuple[str, int], path: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(*address)
    extra = f"Accept: {accept}\r\n" if accept else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), WAIT)  # Connection: close -> EOF
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def test_metrics_endpoint_negotiates_openmetrics(arun: Callable[..., Any]) -> None:
    stats = _stats()

    async def scenario() -> None:
        server = MetricsServer(lambda: stats, server_id="0001", service="echo")
        await server.start("127.0.0.1", 0)
        assert server.address is not None
        try:
            status, headers, body = await _get(server.address, "/metrics")
            assert status == 200 and headers["content-type"] == PROMETHEUS_CONTENT_TYPE
            plain = _shapes(text_string_to_metric_families(body.decode()))
            stats.datagrams_in += 1  # read at scrape time: the next scrape sees it
            status, headers, body = await _get(
                server.address, "/metrics", "application/openmetrics-text; version=1.0.0"
            )
            assert status == 200
            assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
            families = list(parse_openmetrics(body.decode()))
            assert _shapes(families) == plain
            sample = next(s for f in families for s in f.samples if s.name == "datagrams_in_total")
            assert sample.value == 5
        finally:
            await server.aclose()

    arun(scenario())


def test_a_client_that_never_finishes_its_request_is_disconnected(
    arun: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_metrics, "REQUEST_TIMEOUT", 0.3)

    async def scenario() -> None:
        server = MetricsServer(lambda: BackendStats(), server_id="0001", service="echo")
        await server.start("127.0.0.1", 0)
        assert server.address is not None
        try:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed by the server
            writer.close()
            await writer.wait_closed()
            assert (await _get(server.address, "/stats"))[0] == 200
        finally:
            await server.aclose()

    arun(scenario())
