"""LbSnapshot -> Prometheus metrics, exposed through prometheus-client (acceptance.md §4).

A custom collector (:class:`LbCollector`) reads a fresh :class:`LbSnapshot`
at scrape time: nothing is added to the datapath, which keeps bumping its
plain-int counters. The library writes both exposition formats (text 0.0.4,
and OpenMetrics when the scraper's ``Accept`` asks for it: :func:`encode_metrics`).

Rules:

- every metric is declared once, in :data:`METRICS`, with its type and help;
  adding a sample to an undeclared name is a programming error (``KeyError``);
- names are prefixed ``quiclb_``; counters get ``_total`` on their samples;
- every router :class:`~lb.core.router.Outcome` maps to exactly one counter
  family (:data:`OUTCOME_METRICS`), so for each service
  ``rx_client_datagrams = cid_routed + fallback_routed + retry_answered + reset_answered
  + every *_dropped``;
- series that share a name and labels (several routers of one service) are summed;
- nothing here ever sees key material: the snapshot carries counters, names
  and digests only (S-3).

The family and label names are a contract (dashboards and alerts rely on
them); ``tests/control/exposition_families.json`` pins them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry

from lb.control.snapshot import BackendView, LbSnapshot
from lb.core.outcomes import Outcome, RouterStats

#: Content-Type of the 0.0.4 text format (the default when the scraper sends no ``Accept``).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
PREFIX = "quiclb_"

COUNTER = "counter"
GAUGE = "gauge"

#: Every metric the LB exposes: name (without prefix and ``_total``) -> (type, help).
METRICS: dict[str, tuple[str, str]] = {
    # -- client side: one outcome per datagram -----------------------------
    "rx_client_datagrams": (COUNTER, "Datagrams received from clients on a service VIP."),
    "cid_routed": (COUNTER, "Datagrams whose DCID decoded to an active or draining backend."),
    "fallback_routed": (COUNTER, "Datagrams sent to a backend by the keyed 4-tuple fallback, by reason."),
    "unknown_sid_dropped": (COUNTER, "Short-header datagrams dropped: the server ID names no backend."),
    "removed_backend_dropped": (COUNTER, "Short-header datagrams dropped: the server ID of a removed backend."),
    "unroutable_dropped": (COUNTER, "Short-header datagrams dropped: unroutable (0b111 or unknown config) DCID."),
    "no_backend_dropped": (COUNTER, "Datagrams dropped: the fallback had no backend taking new flows."),
    "malformed_dropped": (COUNTER, "Datagrams dropped as malformed, by parse failure."),
    "small_unknown_version_dropped": (COUNTER, "Unknown-version datagrams under 1200 bytes dropped (RFC 9000 5.2.2)."),
    "vn_dropped": (COUNTER, "Version Negotiation packets from clients dropped (RFC 9000 6.1)."),
    "retry_answered": (COUNTER, "Tokenless Initials answered with a Retry by the LB instead of forwarded."),
    "retry_rate_limited_dropped": (COUNTER, "Tokenless Initials dropped: their source was over the Retry rate limit."),
    "token_rejected_dropped": (COUNTER, "Initials dropped: invalid, expired or misaddressed Retry token."),
    "reset_answered": (COUNTER, "Short headers of removed backends answered with a Stateless Reset."),
    "lb_originated": (COUNTER, "Packets the LB built itself (Retry, stateless reset), by type."),
    "lb_originated_rate_limited": (COUNTER, "LB-built packets not sent: per-source rate limit or key budget, by type."),
    "lb_originated_bytes": (COUNTER, "Bytes of the packets the LB built itself."),
    "retry_tokens": (COUNTER, "Retry tokens checked by the LB, by result."),
    "cipher_calls": (COUNTER, "AES block operations spent decoding DCIDs."),
    "decode_cache_entries": (GAUGE, "Entries in the DCID -> backend decode cache."),
    "decode_cache_evictions": (COUNTER, "Decode cache entries evicted for space."),
    # -- return path ---------------------------------------------------------
    "rx_backend_datagrams": (COUNTER, "Datagrams received on the backend-facing (inside) socket."),
    "tx_to_client": (COUNTER, "Backend replies sent to clients from a VIP."),
    "tx_client_bytes": (COUNTER, "Payload bytes of backend replies sent to clients."),
    "return_rejected": (COUNTER, "Inside datagrams rejected (wrong source, bad header, unknown VIP), by reason."),
    # -- backends ------------------------------------------------------------
    "tx_to_backend": (COUNTER, "Datagrams forwarded to a backend."),
    "backend_unreachable": (COUNTER, "Send errors towards a backend."),
    "backend_state": (GAUGE, "1 for the backend's current state among up, down, draining and removed."),
    "backend_healthy": (GAUGE, "1 when the backend answers its health probes."),
    "stale_config_alert": (GAUGE, "1 when the backend's latest handshake SCID does not decode to it (stale config)."),
    "stale_cid_replies": (COUNTER, "Backend handshake replies whose SCID does not decode to that backend."),
    "backend_in_fallback": (GAUGE, "1 when the backend takes new (fallback) flows."),
    "backend_info": (GAUGE, "Always 1; maps the backend label (server ID hex) to its address."),
    "health_probes": (COUNTER, "Health probes sent to a backend."),
    "health_probe_replies": (COUNTER, "Health probe replies received from a backend."),
    "health_probe_rtt_seconds": (GAUGE, "Round-trip time of the backend's last answered probe."),
    # -- services ------------------------------------------------------------
    "service_linkable": (GAUGE, "1 when a plaintext CID configuration is live: observers can link CIDs."),
    "service_fallback_backends": (GAUGE, "Backends in the service's fallback (Maglev) rotation."),
    # -- configuration -------------------------------------------------------
    "fallback_table_builds": (COUNTER, "Maglev fallback table builds."),
    "config_version": (GAUGE, "Version of the running configuration."),
    "config_info": (GAUGE, "Always 1; carries the digest of the running configuration."),
    "config_reloads": (COUNTER, "Configuration reloads applied."),
    "config_rejected": (COUNTER, "Configuration reloads rejected; the previous configuration kept running."),
    "config_last_reload_failed": (GAUGE, "1 when the most recent reload attempt was rejected."),
    # -- process and admin ---------------------------------------------------
    "process_start_time_seconds": (GAUGE, "Start time of the process, seconds since the Unix epoch."),
    "process_rss_bytes": (GAUGE, "Resident set size of the process."),
    "process_open_fds": (GAUGE, "Open file descriptors of the process."),
    "admin_auth_failures": (COUNTER, "Admin API requests refused for a missing or wrong token, or rate-limited."),
    "admin_connections_open": (GAUGE, "Admin API connections open (waiting for a request, in a handler, or writing)."),
    "admin_connections_evicted": (COUNTER, "Admin connections closed before their request arrived, for newer ones."),
    "admin_connections_refused": (COUNTER, "Admin connections refused: every slot busy in a handler."),
    "admin_head_timeouts": (COUNTER, "Admin connections answered 408: no whole request head within the deadline."),
}

#: The counter family of each router outcome (the outcome-sum invariant rests on this table).
OUTCOME_METRICS: dict[Outcome, str] = {
    Outcome.CID_ROUTED: "cid_routed",
    Outcome.FALLBACK_INITIAL: "fallback_routed",
    Outcome.FALLBACK_UNKNOWN_SID: "fallback_routed",
    Outcome.FALLBACK_NO_CONFIG: "fallback_routed",
    Outcome.FALLBACK_SHORT_UNKNOWN_SID: "fallback_routed",
    Outcome.FALLBACK_UNKNOWN_VERSION: "fallback_routed",
    Outcome.UNROUTABLE_DROPPED: "unroutable_dropped",
    Outcome.UNKNOWN_SID_DROPPED: "unknown_sid_dropped",
    Outcome.REMOVED_BACKEND_DROPPED: "removed_backend_dropped",
    Outcome.NO_BACKEND_DROPPED: "no_backend_dropped",
    Outcome.MALFORMED_DROPPED: "malformed_dropped",
    Outcome.SMALL_UNKNOWN_VERSION_DROPPED: "small_unknown_version_dropped",
    Outcome.VN_DROPPED: "vn_dropped",
    Outcome.RETRY_SENT: "retry_answered",
    Outcome.RETRY_RATE_LIMITED: "retry_rate_limited_dropped",
    Outcome.TOKEN_REJECTED: "token_rejected_dropped",
    Outcome.RESET_SENT: "reset_answered",
}

#: Values of the ``state`` label of ``backend_state``.
BACKEND_STATES = ("up", "down", "draining", "removed")

Labels = tuple[tuple[str, str], ...]


class _Families:
    """Samples of one scrape, summed per (family, labels), in declaration order."""

    def __init__(self) -> None:
        self._kinds: dict[str, tuple[str, str]] = dict(METRICS)
        self._samples: dict[str, dict[Labels, float]] = {name: {} for name in METRICS}

    def add(self, name: str, value: float, **labels: str) -> None:
        series = self._samples[name]  # KeyError: undeclared metric
        key = tuple(labels.items())
        series[key] = series.get(key, 0) + value

    def declare_adapter_counter(self, name: str) -> str:
        """An ad-hoc counter family for an adapter counter (``snap.extra``); returns its key for :meth:`add`."""
        key = "adapter_" + "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in name)
        key = key.removesuffix("_total")
        if key not in self._kinds:
            self._kinds[key] = (COUNTER, f"Adapter counter {name!r}.")
            self._samples[key] = {}
        return key

    def metrics(self) -> Iterator[Metric]:
        for name, (kind, text) in self._kinds.items():
            metric = Metric(PREFIX + name, text, kind)
            sample_name = metric.name + ("_total" if kind == COUNTER else "")
            for labels, value in self._samples[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric


def _add_router(fams: _Families, stats: RouterStats) -> None:
    svc = stats.service
    fams.add("rx_client_datagrams", stats.rx_client_datagrams, service=svc)
    for (config_id, backend), n in sorted(stats.cid_routed.items()):
        fams.add("cid_routed", n, service=svc, config=str(config_id), backend=backend)
    for outcome in Outcome:
        name = OUTCOME_METRICS[outcome]
        count = stats.outcomes.get(outcome, 0)
        if name == "cid_routed":
            continue  # per (config, backend) above
        if name == "malformed_dropped":
            for reason, n in sorted(stats.malformed.items()):
                fams.add(name, n, service=svc, reason=reason)
            continue
        fallback_reason = outcome.fallback_reason
        if fallback_reason is not None:
            fams.add(name, count, service=svc, reason=fallback_reason)
        else:
            fams.add(name, count, service=svc)
    for kind in ("retry", "reset"):
        fams.add("lb_originated", stats.lb_originated.get(kind, 0), service=svc, type=kind)
        fams.add("lb_originated_rate_limited", stats.lb_originated_rate_limited.get(kind, 0), service=svc, type=kind)
    fams.add("lb_originated_bytes", stats.lb_originated_bytes, service=svc)
    for result, n in sorted(stats.retry_tokens.items()):
        fams.add("retry_tokens", n, service=svc, result=result)
    fams.add("cipher_calls", stats.cipher_calls, service=svc)
    fams.add("decode_cache_entries", stats.cache_entries, service=svc)
    fams.add("decode_cache_evictions", stats.cache_evictions, service=svc)


def backend_state_label(view: BackendView) -> str:
    """One of :data:`BACKEND_STATES` for a backend view."""
    if view.state in ("removed", "draining"):
        return view.state
    return "up" if view.healthy else "down"


def _add_backend(fams: _Families, view: BackendView) -> None:
    labels = {"service": view.service, "backend": view.server_id}
    fams.add("tx_to_backend", view.tx_datagrams, **labels)
    fams.add("backend_unreachable", view.unreachable, **labels)
    current = backend_state_label(view)
    for state in BACKEND_STATES:
        fams.add("backend_state", int(state == current), **labels, state=state)
    fams.add("backend_healthy", int(view.healthy), **labels)
    fams.add("backend_in_fallback", int(view.in_fallback), **labels)
    fams.add("stale_config_alert", int(view.stale_config), **labels)
    fams.add("stale_cid_replies", view.stale_cid_replies, **labels)
    fams.add("backend_info", 1, **labels, address=view.address)
    fams.add("health_probes", view.probes, **labels)
    fams.add("health_probe_replies", view.probe_replies, **labels)
    if view.last_probe_rtt is not None:
        fams.add("health_probe_rtt_seconds", view.last_probe_rtt, **labels)


def read_process_stats(proc: Path = Path("/proc/self")) -> dict[str, int]:
    """``process_rss_bytes`` and ``process_open_fds`` from procfs; absent keys where unavailable."""
    out: dict[str, int] = {}
    try:
        fields = (proc / "statm").read_text().split()
        out["process_rss_bytes"] = int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        # Listing the directory opens one descriptor of its own; do not count it.
        out["process_open_fds"] = max(0, len(os.listdir(proc / "fd")) - 1)
    except OSError:
        pass
    return out


@dataclass(frozen=True)
class AdminCounters:
    """The admin server's own counters (it is not part of the LB snapshot)."""

    auth_failures: int = 0
    connections_open: int = 0
    connections_evicted: int = 0
    connections_refused: int = 0
    head_timeouts: int = 0


def snapshot_metrics(
    snap: LbSnapshot,
    *,
    process: bool = True,
    admin_auth_failures: int | None = None,
    admin: AdminCounters | None = None,
) -> Iterator[Metric]:
    """Every family of ``snap``, as prometheus-client metric families.

    ``process`` adds RSS and open descriptors read from ``/proc/self`` (skipped
    where procfs is absent). ``admin_auth_failures`` comes from the admin
    server, which does not appear in the snapshot; so does ``admin``, all of its
    counters. ``snap.extra`` counters are
    exposed as ``quiclb_adapter_<name>_total``.
    """
    fams = _Families()
    for stats in snap.routers:
        _add_router(fams, stats)

    ret = snap.return_path
    fams.add("rx_backend_datagrams", ret.rx_backend_datagrams)
    fams.add("tx_to_client", ret.tx_to_client)
    fams.add("tx_client_bytes", ret.tx_client_bytes)
    for reason, n in sorted(ret.rejected.items()):
        fams.add("return_rejected", n, reason=reason)

    for view in snap.backends:
        _add_backend(fams, view)
    for svc in snap.services:
        fams.add("service_linkable", int(svc.linkable), service=svc.name)
        fams.add("service_fallback_backends", svc.fallback_backends, service=svc.name)

    fams.add("fallback_table_builds", snap.fallback_table_builds)
    fams.add("config_version", snap.config_version)
    fams.add("config_info", 1, digest=snap.config_digest)
    fams.add("config_reloads", snap.config_reloads)
    fams.add("config_rejected", snap.config_rejected)
    fams.add("config_last_reload_failed", int(snap.last_reload_error is not None))

    fams.add("process_start_time_seconds", snap.started_at)
    if process:
        for name, value in read_process_stats().items():
            fams.add(name, value)
    if admin_auth_failures is not None:
        fams.add("admin_auth_failures", admin_auth_failures)
    if admin is not None:
        fams.add("admin_auth_failures", admin.auth_failures)
        fams.add("admin_connections_open", admin.connections_open)
        fams.add("admin_connections_evicted", admin.connections_evicted)
        fams.add("admin_connections_refused", admin.connections_refused)
        fams.add("admin_head_timeouts", admin.head_timeouts)

    _add_extra(fams, snap.extra.items())
    return fams.metrics()


def _add_extra(fams: _Families, items: Iterable[tuple[str, int]]) -> None:
    for name, value in sorted(items):
        fams.add(fams.declare_adapter_counter(name), value)


class LbCollector:
    """A prometheus-client collector: one fresh snapshot per scrape, nothing cached between scrapes."""

    def __init__(
        self,
        snapshot: Callable[[], LbSnapshot],
        *,
        process: bool = True,
        admin_auth_failures: Callable[[], int] | None = None,
        admin: Callable[[], AdminCounters] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._process = process
        self._admin_auth_failures = admin_auth_failures
        self._admin = admin

    def collect(self) -> Iterator[Metric]:
        failures = self._admin_auth_failures() if self._admin_auth_failures is not None else None
        admin = self._admin() if self._admin is not None else None
        return snapshot_metrics(self._snapshot(), process=self._process, admin_auth_failures=failures, admin=admin)


def lb_registry(collector: LbCollector) -> CollectorRegistry:
    """A private registry holding only ``collector`` (never the library's global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def encode_metrics(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition the scraper's ``Accept`` header asks for (OpenMetrics or text 0.0.4), with its Content-Type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def render_metrics(snap: LbSnapshot, *, process: bool = True, admin_auth_failures: int | None = None) -> str:
    """``snap`` in the text format 0.0.4 (:data:`CONTENT_TYPE`)."""
    failures: Callable[[], int] | None = None
    if admin_auth_failures is not None:
        count = admin_auth_failures
        failures = lambda: count  # noqa: E731 - a constant for one render
    collector = LbCollector(lambda: snap, process=process, admin_auth_failures=failures)
    return generate_latest(lb_registry(collector)).decode("utf-8")
