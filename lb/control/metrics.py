"""LbSnapshot -> Prometheus text exposition format 0.0.4 (acceptance.md §4).

Written by hand: the format is a few lines of text per series, and a renderer
over a frozen snapshot needs no registry, no global state and no locks.

Rules:

- every metric is declared once, in :data:`METRICS`, with its type and help;
  rendering an undeclared name is a programming error (``KeyError``);
- names are prefixed ``quiclb_``; counters get ``_total`` in the exposition
  (the ``# TYPE`` line too, as prometheus_client writes 0.0.4);
- every router :class:`~lb.core.router.Outcome` maps to exactly one counter
  family (:data:`OUTCOME_METRICS`), so for each service
  ``rx_client_datagrams = cid_routed + fallback_routed + every *_dropped``;
- series that share a name and labels (several routers of one service) are summed;
- label values are escaped (``\\``, ``"``, newline); nothing here ever sees
  key material: the snapshot carries counters, names and digests only (S-3).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lb.control.snapshot import BackendView, LbSnapshot
from lb.core.router import Outcome, RouterStats

#: Content-Type of the 0.0.4 text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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
}

#: Values of the ``state`` label of ``backend_state``.
BACKEND_STATES = ("up", "down", "draining", "removed")

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")

Labels = tuple[tuple[str, str], ...]


@dataclass
class _Family:
    name: str  # exposition name: prefixed, with _total for counters
    kind: str
    help: str
    samples: dict[Labels, float] = field(default_factory=dict)

    def add(self, value: float, labels: Labels = ()) -> None:
        self.samples[labels] = self.samples.get(labels, 0) + value


class _Exposition:
    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        for name, (kind, text) in METRICS.items():
            self._families[name] = _Family(_exposed_name(name, kind), kind, text)

    def add(self, name: str, value: float, **labels: str) -> None:
        self._families[name].add(value, tuple(labels.items()))

    def add_family(self, name: str, kind: str, text: str) -> str:
        """Declare an ad-hoc family (adapter counters); returns its key for :meth:`add`."""
        key = f"adapter_{_INVALID_NAME_CHARS.sub('_', name)}".removesuffix("_total")
        if key not in self._families:
            self._families[key] = _Family(_exposed_name(key, kind), kind, text)
        return key

    def render(self) -> str:
        lines: list[str] = []
        for fam in self._families.values():
            lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
            lines.append(f"# TYPE {fam.name} {fam.kind}")
            for labels, value in fam.samples.items():
                lines.append(f"{fam.name}{_format_labels(labels)} {_format_value(value)}")
        return "\n".join(lines) + "\n"


def _exposed_name(name: str, kind: str) -> str:
    return PREFIX + name + ("_total" if kind == COUNTER else "")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(value: str) -> str:
    """Escape a label value for the text format: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels) + "}"


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


# -- sections -----------------------------------------------------------------


def _render_router(exp: _Exposition, stats: RouterStats) -> None:
    svc = stats.service
    exp.add("rx_client_datagrams", stats.rx_client_datagrams, service=svc)
    for (config_id, backend), n in sorted(stats.cid_routed.items()):
        exp.add("cid_routed", n, service=svc, config=str(config_id), backend=backend)
    for outcome in Outcome:
        name = OUTCOME_METRICS[outcome]
        count = stats.outcomes.get(outcome, 0)
        if name == "cid_routed":
            continue  # per (config, backend) above
        if name == "malformed_dropped":
            for reason, n in sorted(stats.malformed.items()):
                exp.add(name, n, service=svc, reason=reason)
            continue
        fallback_reason = outcome.fallback_reason
        if fallback_reason is not None:
            exp.add(name, count, service=svc, reason=fallback_reason)
        else:
            exp.add(name, count, service=svc)
    exp.add("cipher_calls", stats.cipher_calls, service=svc)
    exp.add("decode_cache_entries", stats.cache_entries, service=svc)
    exp.add("decode_cache_evictions", stats.cache_evictions, service=svc)


def backend_state_label(view: BackendView) -> str:
    """One of :data:`BACKEND_STATES` for a backend view."""
    if view.state in ("removed", "draining"):
        return view.state
    return "up" if view.healthy else "down"


def _render_backend(exp: _Exposition, view: BackendView) -> None:
    labels = {"service": view.service, "backend": view.server_id}
    exp.add("tx_to_backend", view.tx_datagrams, **labels)
    exp.add("backend_unreachable", view.unreachable, **labels)
    current = backend_state_label(view)
    for state in BACKEND_STATES:
        exp.add("backend_state", int(state == current), **labels, state=state)
    exp.add("backend_healthy", int(view.healthy), **labels)
    exp.add("backend_in_fallback", int(view.in_fallback), **labels)
    exp.add("stale_config_alert", int(view.stale_config), **labels)
    exp.add("stale_cid_replies", view.stale_cid_replies, **labels)
    exp.add("backend_info", 1, **labels, address=view.address)
    exp.add("health_probes", view.probes, **labels)
    exp.add("health_probe_replies", view.probe_replies, **labels)
    if view.last_probe_rtt is not None:
        exp.add("health_probe_rtt_seconds", view.last_probe_rtt, **labels)


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


def render_metrics(
    snap: LbSnapshot,
    *,
    process: bool = True,
    admin_auth_failures: int | None = None,
) -> str:
    """Render ``snap`` as Prometheus text 0.0.4 (:data:`CONTENT_TYPE`).

    ``process`` adds RSS and open descriptors read from ``/proc/self`` (skipped
    where procfs is absent). ``admin_auth_failures`` comes from the admin
    server, which does not appear in the snapshot. ``snap.extra`` counters are
    exposed as ``quiclb_adapter_<name>_total``.
    """
    exp = _Exposition()
    for stats in snap.routers:
        _render_router(exp, stats)

    ret = snap.return_path
    exp.add("rx_backend_datagrams", ret.rx_backend_datagrams)
    exp.add("tx_to_client", ret.tx_to_client)
    exp.add("tx_client_bytes", ret.tx_client_bytes)
    for reason, n in sorted(ret.rejected.items()):
        exp.add("return_rejected", n, reason=reason)

    for view in snap.backends:
        _render_backend(exp, view)
    for svc in snap.services:
        exp.add("service_linkable", int(svc.linkable), service=svc.name)
        exp.add("service_fallback_backends", svc.fallback_backends, service=svc.name)

    exp.add("fallback_table_builds", snap.fallback_table_builds)
    exp.add("config_version", snap.config_version)
    exp.add("config_info", 1, digest=snap.config_digest)
    exp.add("config_reloads", snap.config_reloads)
    exp.add("config_rejected", snap.config_rejected)
    exp.add("config_last_reload_failed", int(snap.last_reload_error is not None))

    exp.add("process_start_time_seconds", snap.started_at)
    if process:
        for name, value in read_process_stats().items():
            exp.add(name, value)
    if admin_auth_failures is not None:
        exp.add("admin_auth_failures", admin_auth_failures)

    _render_extra(exp, snap.extra.items())
    return exp.render()


def _render_extra(exp: _Exposition, items: Iterable[tuple[str, int]]) -> None:
    for name, value in sorted(items):
        key = exp.add_family(name, COUNTER, f"Adapter counter {name!r}.")
        exp.add(key, value)

