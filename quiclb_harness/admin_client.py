"""A tiny admin-API client for tests, the demo and benchmarks (stdlib http.client)."""

from __future__ import annotations

import http.client
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def admin_request(address: tuple[str, int], method: str, path: str, token: str | None,
                  timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def admin_json(address: tuple[str, int], path: str, token: str, method: str = "GET") -> Any:
    status, body = admin_request(address, method, path, token)
    return status, json.loads(body) if body else None


def scrape(address: tuple[str, int], token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    status, body = admin_request(address, "GET", "/metrics", token)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}: {body[:200]!r}")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for (n, lbls), v in samples.items():
        if n == name and all((k, val) in lbls for k, val in labels.items()):
            total += v
    return total
