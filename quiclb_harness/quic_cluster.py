"""A real deployment on loopback: quiclb processes and aioquic backend processes.

Shared by the end-to-end tests and ``quiclb demo``. Every process is started
here, waited for on its READY line, and stopped by PID in :meth:`close`.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiclb_harness.admin_client import admin_request, scrape
from quiclb_harness.deployment import BackendSpec, CidConfigSpec, Deployment, ServiceSpec
from quiclb_harness.processes import ManagedProcess, start_backend, start_lb


@dataclass
class BackendProcess:
    server_id: str
    process: ManagedProcess
    metrics: tuple[str, int]

    def stats(self) -> dict[str, Any]:
        """The backend's counters (``/stats`` JSON): unknown_cid_packets, connections_open, ..."""
        url = f"http://{self.metrics[0]}:{self.metrics[1]}/stats"
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
        return doc


@dataclass
class QuicCluster:
    """LB instance(s) in front of aioquic backends, all on loopback."""

    directory: Path
    server_ids: list[str] = field(default_factory=lambda: ["0001", "0002", "0003"])
    host: str = "127.0.0.1"
    cid: CidConfigSpec = field(default_factory=CidConfigSpec)
    backend_args: tuple[str, ...] = ()
    return_mode: str = "via-lb"
    retry: str = "off"
    retry_flood_threshold: int | None = None
    reset_key: bool = False
    dep: Deployment = field(init=False)
    lbs: list[ManagedProcess] = field(default_factory=list)
    backends: dict[str, BackendProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = ServiceSpec(vip_host=self.host, cid_configs=[self.cid],
                           backends=[BackendSpec(sid, host=self.host) for sid in self.server_ids],
                           retry=self.retry, retry_flood_threshold=self.retry_flood_threshold,
                           reset_key=self.reset_key)
        self.dep = Deployment(self.directory, [spec], inside_host=self.host, tls=True, return_mode=self.return_mode)
        self.dep.write()

    # -- processes ------------------------------------------------------------

    def start(self, lbs: int = 1) -> QuicCluster:
        for sid in self.server_ids:
            self.start_backend(sid)
        for _ in range(lbs):
            self.start_lb()
        return self

    def start_backend(self, server_id: str) -> BackendProcess:
        p = start_backend(self.dep.path, server_id, "--metrics", "127.0.0.1:0", *self.backend_args)
        host, port = p.wait_ready()["metrics"].rsplit(":", 1)
        bp = BackendProcess(server_id, p, (host, int(port)))
        self.backends[server_id] = bp
        return bp

    def start_lb(self, *extra: str, env: dict[str, str] | None = None) -> ManagedProcess:
        p = start_lb(self.dep.path, *extra, env=env)
        self.lbs.append(p)
        return p

    def admin(self, lb: ManagedProcess | None = None) -> tuple[str, int]:
        lb = lb or self.live_lbs()[0]
        host, port = lb.wait_ready()["admin"].rsplit(":", 1)
        return host, int(port)

    def live_lbs(self) -> list[ManagedProcess]:
        return [p for p in self.lbs if p.alive()]

    def lb_metrics(self, lb: ManagedProcess | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.admin(lb), self.dep.token)

    # -- configuration changes ------------------------------------------------

    def reload_lbs(self) -> None:
        """Rewrite nothing; ask every live LB to reload and check each accepted it."""
        for lb in self.live_lbs():
            status, body = admin_request(self.admin(lb), "POST", "/reload", self.dep.token)
            if status != 200:
                raise RuntimeError(f"LB {lb.pid} refused the reload: {body[:300]!r}")

    def add_backend(self, server_id: str) -> BackendProcess:
        """Scale out: config first, backend started, then the LBs learn of it."""
        self.dep.services[0].backends.append(BackendSpec(server_id, host=self.host))
        self.dep.version += 1
        self.dep.write()
        bp = self.start_backend(server_id)
        self.server_ids.append(server_id)
        self.reload_lbs()
        return bp

    def set_state(self, server_id: str, state: str) -> None:
        for b in self.dep.services[0].backends:
            if b.server_id == server_id:
                b.state = state
        self.dep.version += 1
        self.dep.write()
        self.reload_lbs()

    def restart_lb(self, lb: ManagedProcess, *, hard: bool = True) -> tuple[ManagedProcess, float]:
        """kill -9 (or SIGTERM) and start a new instance; returns it and the gap in seconds."""
        t0 = time.monotonic()
        if hard:
            lb.kill()
        else:
            lb.signal(signal.SIGTERM)
            lb.stop()
        new = self.start_lb()
        return new, time.monotonic() - t0

    def close(self) -> None:
        for lb in self.lbs:
            lb.kill()
        for b in self.backends.values():
            b.process.stop(timeout=5)

    @property
    def cert_pem(self) -> bytes:
        return self.dep.cert_path.read_bytes()
