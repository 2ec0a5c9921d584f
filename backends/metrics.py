"""A backend's ``/metrics`` (Prometheus, through prometheus-client) and ``/stats`` (JSON), on loopback.

Metric names follow the acceptance standard's backend counters, with the
Prometheus ``_total`` suffix on counters: ``unknown_cid_packets_total``,
``encap_rejected_total{reason}``, ``connections_open``,
``issued_cids_total{config}``, ``datagrams_in_total``, ``datagrams_out_total``.
Every sample carries ``server_id`` and ``service`` labels. They are a contract
(``tests/control/exposition_families.json`` pins them).

:class:`BackendCollector` reads the :class:`BackendStats` at scrape time, so
the datapath keeps bumping plain ints. The HTTP side is aiohttp's low-level
server (the stack the LB's admin API uses): GET only, one request per
connection, bounded request head, and a connection that has not sent a whole
request within :data:`REQUEST_TIMEOUT` is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry

from backends.stats import BackendStats

log = logging.getLogger("quiclb.backend.metrics")

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: Longest request line or header field the metrics server reads.
MAX_REQUEST_BYTES = 8192
#: Most header fields in one request.
MAX_HEADERS = 64
#: Seconds a client may take to send its request (aiohttp closes an idle connection after it).
REQUEST_TIMEOUT = 5.0


class BackendCollector:
    """A prometheus-client collector over one backend's counters, read at scrape time."""

    def __init__(self, stats: Callable[[], BackendStats], *, server_id: str, service: str) -> None:
        self._stats = stats
        self._base = {"server_id": server_id, "service": service}

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()

        def family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], int]]) -> Metric:
            metric = Metric(name, help_text, kind)
            sample_name = name + ("_total" if kind == "counter" else "")
            for extra, value in samples:
                metric.add_sample(sample_name, {**self._base, **extra}, value)
            return metric

        yield family("datagrams_in", "counter", "Datagrams received on the encapsulation socket.",
                     [({}, stats.datagrams_in)])
        yield family("datagrams_out", "counter", "Reply datagrams sent (via the LB or direct).",
                     [({}, stats.datagrams_out)])
        yield family("unknown_cid_packets", "counter",
                     "Datagrams dropped because their DCID belongs to no live connection.",
                     [({}, stats.unknown_cid_packets)])
        yield family("encap_rejected", "counter", "Encapsulated datagrams rejected, by reason.",
                     [({"reason": reason}, n) for reason, n in sorted(stats.encap_rejected.items())])
        yield family("connections_open", "gauge", "QUIC connections currently open.", [({}, stats.connections_open)])
        yield family("connections", "counter", "QUIC connections created.", [({}, stats.connections_total)])
        yield family("issued_cids", "counter", "Connection IDs issued, by QUIC-LB config ID (7 = unroutable).",
                     [({"config": config}, n) for config, n in sorted(stats.issued_cids.items())])
        yield family("send_errors", "counter", "Replies that could not be sent.", [({}, stats.send_errors)])
        yield family("config_reloads", "counter", "Configuration reloads applied.", [({}, stats.reloads)])
        yield family("config_reload_failures", "counter", "Configuration reloads refused.",
                     [({}, stats.reload_failures)])


def backend_registry(stats: Callable[[], BackendStats], *, server_id: str, service: str) -> CollectorRegistry:
    """A private registry (never the library's global one) holding one :class:`BackendCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BackendCollector(stats, server_id=server_id, service=service))
    return registry


def render_prometheus(stats: BackendStats, *, server_id: str, service: str) -> str:
    """The counters of one backend in Prometheus text format 0.0.4."""
    return generate_latest(backend_registry(lambda: stats, server_id=server_id, service=service)).decode("utf-8")


class MetricsServer:
    """Serves ``GET /metrics`` and ``GET /stats`` from a callable producing the current stats."""

    def __init__(self, stats: Callable[[], BackendStats], *, server_id: str, service: str) -> None:
        self._stats = stats
        self._server_id = server_id
        self._service = service
        self._registry = backend_registry(stats, server_id=server_id, service=service)
        self._http: web.Server | None = None
        self._listener: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> None:
        self._http = web.Server(
            self._handle,
            access_log=None,
            # Without a request the keep-alive timer is the only clock aiohttp runs: it closes
            # a connection that has not delivered a whole request head in time.
            keepalive_timeout=REQUEST_TIMEOUT,
            max_line_size=MAX_REQUEST_BYTES,
            max_field_size=MAX_REQUEST_BYTES,
            max_headers=MAX_HEADERS,
        )
        listener = await asyncio.get_running_loop().create_server(self._http, host, port)
        self._listener = listener
        sockname = listener.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])

    def close(self) -> None:
        """Stop listening; a request in flight finishes on its own (each connection serves one)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    async def aclose(self) -> None:
        """:meth:`close`, then end the connections still open."""
        self.close()
        if self._http is not None:
            await self._http.shutdown(1.0)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "GET":
            response = web.Response(status=405, text="GET only\n", headers={"Allow": "GET"})
        elif request.path == "/metrics":
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
            response = web.Response(body=encoder(self._registry))
            response.headers["Content-Type"] = content_type
        elif request.path == "/stats":
            doc = {"server_id": self._server_id, "service": self._service, **self._stats().snapshot()}
            response = web.Response(text=json.dumps(doc, sort_keys=True), content_type="application/json")
        else:
            response = web.Response(status=404, text="not found\n")
        response.force_close()  # one request per connection: nothing idles between scrapes
        return response
