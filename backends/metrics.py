"""A backend's ``/metrics`` (Prometheus text format 0.0.4) and ``/stats`` (JSON), on loopback.

Metric names follow the acceptance standard's backend counters, with the
Prometheus ``_total`` suffix on counters: ``unknown_cid_packets_total``,
``encap_rejected_total{reason}``, ``connections_open``,
``issued_cids_total{config}``, ``datagrams_in_total``, ``datagrams_out_total``.
Every sample carries ``server_id`` and ``service`` labels.

The HTTP server is a few lines of asyncio: one request per connection, GET only,
bounded request size and read timeout, so it needs no thread and no framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable

from backends.stats import BackendStats

log = logging.getLogger("quiclb.backend.metrics")

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Largest request head the metrics server reads.
MAX_REQUEST_BYTES = 8192
#: Seconds a client may take to send its request.
REQUEST_TIMEOUT = 5.0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


#: One sample: extra labels and the value.
_Sample = tuple[tuple[tuple[str, str], ...], int]


def render_prometheus(stats: BackendStats, *, server_id: str, service: str) -> str:
    """The counters of one backend in Prometheus text format."""
    base = (("server_id", server_id), ("service", service))
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[_Sample]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for extra, value in samples:
            lines.append(f"{name}{_labels((*base, *extra))} {value}")

    family("datagrams_in_total", "counter", "Datagrams received on the encapsulation socket.",
           [((), stats.datagrams_in)])
    family("datagrams_out_total", "counter", "Reply datagrams sent (via the LB or direct).",
           [((), stats.datagrams_out)])
    family("unknown_cid_packets_total", "counter",
           "Datagrams dropped because their DCID belongs to no live connection.",
           [((), stats.unknown_cid_packets)])
    family("encap_rejected_total", "counter", "Encapsulated datagrams rejected, by reason.",
           [((("reason", reason),), count) for reason, count in sorted(stats.encap_rejected.items())])
    family("connections_open", "gauge", "QUIC connections currently open.", [((), stats.connections_open)])
    family("connections_total", "counter", "QUIC connections created.", [((), stats.connections_total)])
    family("issued_cids_total", "counter", "Connection IDs issued, by QUIC-LB config ID (7 = unroutable).",
           [((("config", config),), count) for config, count in sorted(stats.issued_cids.items())])
    family("send_errors_total", "counter", "Replies that could not be sent.", [((), stats.send_errors)])
    family("config_reloads_total", "counter", "Configuration reloads applied.", [((), stats.reloads)])
    family("config_reload_failures_total", "counter", "Configuration reloads refused.",
           [((), stats.reload_failures)])
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves ``GET /metrics`` and ``GET /stats`` from a callable producing the current stats."""

    def __init__(self, stats: Callable[[], BackendStats], *, server_id: str, service: str) -> None:
        self._stats = stats
        self._server_id = server_id
        self._service = service
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def _body(self, path: str) -> tuple[str, str, bytes]:
        stats = self._stats()
        if path == "/metrics":
            text = render_prometheus(stats, server_id=self._server_id, service=self._service)
            return "200 OK", PROMETHEUS_CONTENT_TYPE, text.encode()
        if path == "/stats":
            doc = {"server_id": self._server_id, "service": self._service, **stats.snapshot()}
            return "200 OK", "application/json", json.dumps(doc, sort_keys=True).encode()
        return "404 Not Found", "text/plain; charset=utf-8", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            if len(parts) != 3:
                raise ValueError("bad request line")
            method, target = parts[0], parts[1]
            if method != "GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain; charset=utf-8", b"GET only\n"
            else:
                status, ctype, body = self._body(target.split("?", 1)[0])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("latin-1") + body
            )
            await writer.drain()
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError) as exc:
            log.debug("metrics request failed: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
