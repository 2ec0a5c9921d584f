"""R-21 soak (acceptance.md §2.2): W(n, t) through a real LB while a random fault strikes on a schedule.

Faults, dealt from seeded shuffles of the four kinds (the seed is printed; any four
consecutive faults include each kind once):

* ``lb_restart``: kill -9 the LB and start a new one (the tested promise: nothing is lost);
* ``backend_add``: a new backend process, the config file rewritten, SIGHUP to the LB;
* ``backend_remove``: the config file rewritten without one backend, SIGHUP, then the backend
  stops. Its connections are lost by design ("0 lost except on crashed backends"): requests
  made on them are exempt, and each is replaced by a new connection (placed by
  the fallback) under the same index, whose requests count again, so W(n) keeps n live
  connections for the whole run instead of dwindling as backends come and go;
* ``rebind``: a random third of the connections move to a new local port (NAT rebinding).

Alongside W(n, t) a trickle of short connections (echo, then close; every fifth sends one
Initial and vanishes) keeps connections finishing on the backends, which is what made them
grow (issue 13 item 4). The LB's and every backend's RSS and open fds are read from
``/proc/PID`` at each fault and at the end. Blocking steps (process start, config writes,
reads of /proc and /metrics) run in a thread so the workload's event loop never stalls.
Every loop is bounded by count and time; processes are stopped by PID by the cluster.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from lb import CidConfig, decode_server_id
from quiclb_harness.admin_client import metric_sum
from quiclb_harness.deployment import BackendSpec
from quiclb_harness.processes import ManagedProcess
from quiclb_harness.quic_cluster import QuicCluster
from quiclb_harness.waiting import wait_until
from quiclb_harness.workload import EchoWorkload, WorkloadReport, close_clients, open_clients

if TYPE_CHECKING:
    from backends.client import EchoClient

FAULTS = ("lb_restart", "backend_add", "backend_remove", "rebind")
#: Backends never drop below / rise above these (removing the last ones would lose everything).
MIN_BACKENDS = 2
MAX_BACKENDS = 5
RELOAD_TIMEOUT = 10.0


@dataclass(frozen=True)
class SoakPlan:
    duration: float
    fault_every: float
    connections: int
    interval: float
    seed: int
    #: Short connections per second beside the workload (0: none).
    churn_per_second: float = 2.0
    #: Readings before this many seconds count as warm-up (not compared).
    warm_up: float = 20.0


@dataclass
class Reading:
    at: float
    pid: int
    rss_kb: int
    fds: int
    #: Backends: connections open at the time (their memory is live, not leaked).
    connections: int = 0


@dataclass
class SoakReport:
    plan: SoakPlan
    workload: WorkloadReport | None = None
    faults: list[tuple[float, str, str]] = field(default_factory=list)
    #: ``id()`` of the client objects replaced because their backend was removed: failures of
    #: requests made on them are exempt. By object, not by time: a request sent in the loop
    #: iteration of the replacement carries the replacement's timestamp but may use either.
    retired: set[int] = field(default_factory=set)
    replaced: int = 0
    lb_readings: list[Reading] = field(default_factory=list)
    backend_readings: dict[str, list[Reading]] = field(default_factory=dict)
    churn_ok: int = 0
    churn_failed: int = 0

    @property
    def lost(self) -> set[int]:
        assert self.workload is not None
        failed = {r.connection for r in self.workload.failures if r.client_id not in self.retired}
        return failed | set(self.workload.closed)


def proc_reading(pid: int, at: float) -> Reading:
    """VmRSS and the number of open fds of ``pid`` from procfs."""
    import os  # noqa: PLC0415

    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return Reading(at, pid, rss, len(os.listdir(f"/proc/{pid}/fd")))


class Soak:
    """Run one :class:`SoakPlan` on a started :class:`QuicCluster` with one LB."""

    def __init__(self, cluster: QuicCluster, plan: SoakPlan, log: Callable[[str], None] = print) -> None:
        self.cluster = cluster
        self.plan = plan
        self.log = log
        self.rng = random.Random(plan.seed)
        self.report = SoakReport(plan)
        self._next_sid = 1 + max(int(s, 16) for s in cluster.server_ids)
        self._t0 = 0.0
        self._deck: list[str] = []
        self._removed: list[ManagedProcess] = []

    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    async def run(self) -> SoakReport:
        plan, cluster = self.plan, self.cluster
        self.log(f"R-21 soak: seed={plan.seed} W({plan.connections}, {plan.interval}s) for {plan.duration:.0f}s, "
                 f"a fault every {plan.fault_every:.0f}s, {plan.churn_per_second}/s short connections")
        host, port = cluster.dep.vip()
        clients = await open_clients(host, port, plan.connections, cadata=cluster.cert_pem)
        self._t0 = time.monotonic()
        workload = EchoWorkload(clients, plan.interval)
        self._workload = workload
        self._retired: list[EchoClient] = []
        run = asyncio.ensure_future(workload.run(plan.duration))
        churn = asyncio.ensure_future(self._churn(host, port))
        try:
            await self._read_resources()
            max_faults = int(plan.duration / plan.fault_every) + 1
            for k in range(1, max_faults + 1):
                at = self._t0 + k * plan.fault_every
                if at >= self._t0 + plan.duration - 2:
                    break
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                await self._fault()
                await self._read_resources()
                self.log(f"[{self._elapsed():6.1f}s] {workload.answered} answered, "
                         f"{len(workload.report.failures)} failed, churn {self.report.churn_ok} ok "
                         f"{self.report.churn_failed} failed; LB rss {self.report.lb_readings[-1].rss_kb} kB "
                         f"fds {self.report.lb_readings[-1].fds}")
            self.report.workload = await run
        finally:
            workload.stop()
            churn.cancel()
            await asyncio.gather(run, churn, return_exceptions=True)
            await close_clients([*workload.clients, *self._retired])
        await self._read_resources()
        self.log(f"R-21 soak done (seed={plan.seed}): {self.report.workload.summary()}; "
                 f"replaced {self.report.replaced} on removed backends, lost {len(self.report.lost)}")
        return self.report

    # -- faults ---------------------------------------------------------------------

    def _draw(self) -> str:
        """The next fault: a seeded shuffle of all kinds, dealt in turn, so that any four
        consecutive faults include each kind once (a short run still sees every kind)."""
        if not self._deck:
            self._deck = list(FAULTS)
            self.rng.shuffle(self._deck)
        return self._deck.pop()

    async def _fault(self) -> None:
        kind = self._draw()
        live = len(self.cluster.backends)
        if kind == "backend_remove" and live <= MIN_BACKENDS:
            kind = "backend_add"
        elif kind == "backend_add" and live >= MAX_BACKENDS:
            kind = "backend_remove"
        detail = await getattr(self, "_" + kind)()
        self.report.faults.append((self._elapsed(), kind, detail))
        self.log(f"[{self._elapsed():6.1f}s] fault {kind}: {detail}")

    async def _lb_restart(self) -> str:
        old = self.cluster.live_lbs()[0]
        new, gap = await asyncio.to_thread(self.cluster.restart_lb, old)
        return f"pid {old.pid} killed, pid {new.pid} ready after {gap:.2f}s"

    async def _rebind(self) -> str:
        clients = self._workload.clients
        chosen = self.rng.sample(range(len(clients)), max(1, len(clients) // 3))
        for i in chosen:
            await clients[i].rebind()
        return f"{len(chosen)} connections on new ports"

    def _reload_lb(self) -> None:
        """SIGHUP the LB and wait until it runs the version just written."""
        lb = self.cluster.live_lbs()[0]
        version = self.cluster.dep.version
        lb.signal(signal.SIGHUP)
        wait_until(lambda: metric_sum(self.cluster.lb_metrics(lb), "quiclb_config_version") == version,
                   RELOAD_TIMEOUT, f"LB {lb.pid} on config version {version}")

    async def _backend_add(self) -> str:
        sid = f"{self._next_sid:04x}"
        self._next_sid += 1

        def add() -> None:
            dep = self.cluster.dep
            dep.services[0].backends.append(BackendSpec(sid, host=self.cluster.host))
            dep.version += 1
            dep.write()
            self.cluster.start_backend(sid)  # before the LB sends it anything
            self.cluster.server_ids.append(sid)
            self._reload_lb()

        await asyncio.to_thread(add)
        return f"backend {sid} added"

    async def _backend_remove(self) -> str:
        sid = self.rng.choice(sorted(self.cluster.backends))
        key = self.cluster.dep.key("echo", 0)
        cfg = CidConfig(0, 2, 14, key)
        clients = self._workload.clients
        on_it = [i for i, c in enumerate(clients) if decode_server_id(cfg, c.dcid) == bytes.fromhex(sid)]

        def remove() -> None:
            dep = self.cluster.dep
            dep.services[0].backends = [b for b in dep.services[0].backends if b.server_id != sid]
            dep.version += 1
            dep.write()
            self._reload_lb()
            backend = self.cluster.backends.pop(sid)
            self.cluster.server_ids.remove(sid)
            self._removed.append(backend.process)
            backend.process.stop(timeout=5)

        await asyncio.to_thread(remove)
        # Replace them (the fallback places the new ones on the backends left); requests made on
        # an old connection may fail and are exempt, those on its replacement count.
        host, port = self.cluster.dep.vip()
        fresh = await open_clients(host, port, len(on_it), cadata=self.cluster.cert_pem, concurrency=4) if on_it else []
        for i, client in zip(on_it, fresh, strict=True):
            self._retired.append(clients[i])  # kept (closed at the end), so its id() stays its own
            self.report.retired.add(id(clients[i]))
            clients[i] = client
        self.report.replaced += len(fresh)
        await close_clients(self._retired[-len(fresh):] if fresh else [])
        return f"backend {sid} removed ({len(on_it)} workload connections on it, replaced)"

    # -- background -----------------------------------------------------------------

    async def _churn(self, host: str, port: int) -> None:
        """Short connections at ``churn_per_second``, bounded by the plan's duration."""
        from backends.client import EchoClient  # noqa: PLC0415 - the harness imports backends lazily

        rate = self.plan.churn_per_second
        if rate <= 0:
            return
        max_count = int(self.plan.duration * rate) + 1
        pending: set[asyncio.Task[None]] = set()

        async def one(i: int) -> None:
            if i % 5 == 4:
                send_one_initial(host, port)
                return
            try:
                client = await EchoClient.open(host, port, cadata=self.cluster.cert_pem, timeout=5.0)
                try:
                    await client.echo(b"c" * 100, timeout=3.0)
                finally:
                    await client.close(wait=False)
                self.report.churn_ok += 1
            except Exception:  # a handshake caught by a backend removal; counted, not raised
                self.report.churn_failed += 1

        for i in range(max_count):
            at = self._t0 + i / rate
            if at >= self._t0 + self.plan.duration:
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            task = asyncio.ensure_future(one(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending, return_exceptions=True)

    async def _read_resources(self) -> None:
        at = self._elapsed()
        lb = self.cluster.live_lbs()[0]
        self.report.lb_readings.append(await asyncio.to_thread(proc_reading, lb.pid, at))
        for sid, backend in list(self.cluster.backends.items()):
            if backend.process.alive():
                reading = await asyncio.to_thread(proc_reading, backend.process.pid, at)
                reading.connections = int((await asyncio.to_thread(backend.stats))["connections_open"])
                self.report.backend_readings.setdefault(sid, []).append(reading)


def send_one_initial(host: str, port: int) -> None:
    """A valid client Initial from a socket closed right away: a client that vanishes."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["quiclb-echo"]))
    quic.connect((host, port), now=time.monotonic())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        for data, _ in quic.datagrams_to_send(now=time.monotonic()):
            sock.sendto(data, (host, port))
