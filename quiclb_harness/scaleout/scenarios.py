"""The issue-10 acceptance steps on a :class:`ScaleoutTopology`, shared by the tests and the demo.

Each step measures and records (it never asserts): the tests assert on the
record, the demo prints it as promises and keeps it as JSON. Waits are on
conditions with deadlines (router routes, counters, process exits).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from quiclb_harness.admin_client import metric_sum, scrape
from quiclb_harness.scaleout.clients import FallbackOracle, download, open_client, open_many
from quiclb_harness.scaleout.netns import NamespaceLoop, call_in, run
from quiclb_harness.scaleout.topology import ADMIN_PORT, ScaleoutTopology
from quiclb_harness.workload import EchoWorkload, WorkloadReport, close_clients

if TYPE_CHECKING:
    from backends.client import EchoClient

DOWNLOAD_BYTES = 2 * 1024 * 1024
DOWNLOAD_TIMEOUT = 30.0
H3 = "h3"
#: Probe answers each LB must have heard from each backend before "every LB sees every backend healthy".
MIN_PROBE_REPLIES = 3
#: A handshake slower than this lost a datagram on the way and was recovered by retransmission.
SLOW_HANDSHAKE = 0.5


@dataclass
class HandshakeRecord:
    started: float
    ended: float
    local: tuple[str, int] = ("", 0)
    served_by: str = ""
    predicted: str = ""
    attempts: int = 0
    error: str = ""


@dataclass
class Results:
    """Everything measured; ``asdict`` is the JSON the demo keeps."""

    lbs: int = 0
    return_mode: str = ""
    health: dict[str, dict[str, bool]] = field(default_factory=dict)  # LB -> backend -> healthy and answering
    health_end: dict[str, dict[str, bool]] = field(default_factory=dict)  # the same after every step
    #: "backend ... is down" log lines per LB over the run: a health flip changes that LB's fallback table.
    health_flips: dict[str, int] = field(default_factory=dict)
    spread: dict[str, int] = field(default_factory=dict)  # LB -> client datagrams during the spread window
    kill: dict[str, Any] = field(default_factory=dict)
    drain: dict[str, Any] = field(default_factory=dict)
    add: dict[str, Any] = field(default_factory=dict)
    handshakes: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    ngtcp2: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)  # LB -> final counters

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Driver:
    """A topology, a client loop in its client namespace, and the measurements."""

    def __init__(self, topo: ScaleoutTopology) -> None:
        self.topo = topo
        self.loop = NamespaceLoop(topo.client.name)
        self.cadata = topo.dep.cert_path.read_bytes()
        self.oracle = FallbackOracle(topo.dep.path)
        self.results = Results(lbs=len(topo.nodes), return_mode=topo.return_mode)
        self.clients: list[EchoClient] = []

    def close(self) -> None:
        if self.clients:
            self.loop.run(close_clients(self.clients), 30)
        self.loop.close()

    # -- per-LB observation -----------------------------------------------------

    def metrics(self, index: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        token = self.topo.dep.token
        return call_in(self.topo.nodes[index].ns.name, lambda: scrape(("127.0.0.1", ADMIN_PORT), token))

    def counter(self, index: int, name: str) -> int:
        m = self.metrics(index)
        return int(metric_sum(m, name + "_total") or metric_sum(m, name))

    def rx(self, index: int) -> int:
        return self.counter(index, "quiclb_rx_client_datagrams")

    def health_matrix(self, min_replies: int = MIN_PROBE_REPLIES) -> dict[str, dict[str, bool]]:
        """LB -> backend -> healthy with probe answers heard (backends start healthy before any answer)."""
        out = {}
        for i in self.topo.live():
            out[f"lb{i}"] = {b["server_id"]: bool(b["healthy"]) and b["probe_replies"] >= min_replies
                             for b in self.topo.admin_json(i, "/backends")}
        return out

    def wait_all_healthy(self, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            matrix = self.health_matrix()
            self.results.health = matrix
            if matrix and all(all(row.values()) and len(row) == len(self.topo.server_ids) for row in matrix.values()):
                return True
            time.sleep(0.1)
        return False

    # -- steps --------------------------------------------------------------------

    def open_workload(self, n: int, interval: float, max_duration: float) -> tuple[EchoWorkload, Any]:
        pairs = self.loop.run(open_many(n, self.cadata), 120)
        self.clients = [c for c, _ in pairs]
        workload = EchoWorkload(self.clients, interval)
        return workload, self.loop.submit(workload.run(max_duration))

    def finish_workload(self, workload: EchoWorkload, future: Any) -> WorkloadReport:
        self.loop.call(workload.stop)
        report: WorkloadReport = future.result(60)
        self.results.workload = {"connections": report.connections, "interval": report.interval,
                                 "requests": len(report.results), "failed": len(report.failures),
                                 "lost": len(report.lost), "summary": report.summary()}
        return report

    def measure_spread(self, seconds: float) -> dict[str, int]:
        """Client datagrams each live LB received over ``seconds`` of the running workload."""
        before = {i: self.rx(i) for i in self.topo.live()}
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.1)
        self.results.spread = {f"lb{i}": self.rx(i) - b for i, b in before.items()}
        return self.results.spread

    def kill_mid_transfer(self, index: int, *, host: bool, downloads: int = 6) -> dict[str, Any]:
        """Downloads in flight on ``downloads`` HTTP/3 connections and handshakes streaming, then LB ``index`` dies.

        ``host``: the whole LB host stops dead (every process frozen, then kill -9: the router must
        notice by BFD or the hold timer); else kill -9 of the quiclb process alone (its speaker
        withdraws on the failed health checks).
        """
        node = self.topo.nodes[index]
        assert node.quiclb is not None
        h3 = [c for c, _ in self.loop.run(open_many(downloads, self.cadata, alpn=H3), 60)]
        stream = HandshakeStream(self)
        tasks = self.loop.run(_start_downloads(h3, DOWNLOAD_BYTES), 30)
        lost_by_port = self.topo.ingress_by_port(index)
        lost_before = sum(lost_by_port.values())
        killed = time.monotonic()
        if host:
            node.freeze()
        else:
            node.quiclb.signal(signal.SIGKILL)
        record: dict[str, Any] = {"lb": index, "what": "LB host (all processes)" if host else "quiclb process",
                                  "downloads": downloads, "download_bytes": DOWNLOAD_BYTES,
                                  "in_flight_at_kill": sum(not t.done() for t in tasks)}
        try:
            self.topo.wait_nexthops(lambda hops: node.address not in hops, 15, f"LB {index} withdrawn", 0.005)
            record["withdrawal_ms"] = round((time.monotonic() - killed) * 1000)
        except AssertionError as exc:
            record["withdrawal_ms"] = None
            record["error"] = str(exc)
        stream.mark_change(time.monotonic())
        time.sleep(0.3)  # datagrams already on the wire at the withdrawal still land
        lost = self.topo.ingress_by_port(index)
        record["datagrams_lost"] = sum(lost.values()) - lost_before
        record["datagrams_lost_by_port"] = {str(port): n - lost_by_port[port] for port, n in lost.items()}
        record["mechanism"] = self.withdrawal_cause(index) if host else "health check (quiclb announce)"
        if host:
            node.kill_all()
        else:
            node.quiclb.kill()
        results = self.loop.run(_gather(tasks), DOWNLOAD_TIMEOUT + 10)
        record["downloads_completed"] = sum(r is True for r in results)
        record["download_errors"] = [str(r) for r in results if r is not True][:3]
        record["new_handshakes"] = sum(c.protocol.terminated is not None for c in h3)
        self.loop.run(close_clients(h3), 30)
        self.results.handshakes["kill_host" if host else "kill_process"] = stream.finish(after=0.5)
        self.results.kill["host" if host else "process"] = record
        return record

    def restart(self, index: int) -> float:
        """Start quiclb (and its announce loop) again on LB ``index``: seconds until re-announced."""
        node = self.topo.nodes[index]
        t0 = time.monotonic()
        if node.announcer is not None:
            node.announcer.stop()
        self.topo.start_quiclb(node)
        self.topo.wait_nexthops(lambda hops: node.address in hops, 15, f"LB {index} announced again")
        took = time.monotonic() - t0
        self.results.kill["restart_announced_s"] = round(took, 2)
        return took

    def withdrawal_cause(self, index: int) -> str:
        text = run(["birdc", "-s", self.topo.router_socket, "show", "protocols", "all", f"lb{index}"], check=False)
        for line in text.splitlines():
            if "Last error" in line:
                error = line.split(":", 1)[1].strip()
                return "BFD" if "BFD" in error else "BGP hold timer" if "Hold timer" in error else error
        return "unknown"

    def drain(self, index: int) -> dict[str, Any]:
        """SIGUSR1 to LB ``index`` with handshakes streaming: withdrawal, silence, exit."""
        node = self.topo.nodes[index]
        assert node.quiclb is not None
        stream = HandshakeStream(self)
        t0 = time.monotonic()
        node.quiclb.signal(signal.SIGUSR1)
        record: dict[str, Any] = {"lb": index}
        try:
            self.topo.wait_nexthops(lambda hops: node.address not in hops, 10, f"LB {index} withdrawn on drain")
            withdrawn = time.monotonic()
            record["withdrawal_ms"] = round((withdrawn - t0) * 1000)
        except AssertionError as exc:
            withdrawn = time.monotonic()
            record["withdrawal_ms"] = None
            record["error"] = str(exc)
        time.sleep(0.2)
        rx_at, ingress_at = self.rx(index), self.topo.ingress(index)
        samples = []
        while node.quiclb.alive() and time.monotonic() - withdrawn < 20:
            try:
                samples.append(self.rx(index))
            except OSError:
                break
            time.sleep(0.2)
        try:
            record["exit_code"] = node.quiclb.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            record["exit_code"] = None
        record["stopped_after_s"] = round(time.monotonic() - t0, 2)
        record["rx_after_withdrawal"] = (samples[-1] - rx_at) if samples else 0
        record["ingress_after_withdrawal"] = self.topo.ingress(index) - ingress_at
        record["drained_log"] = any("drained:" in line for line in node.quiclb.lines)
        stream.mark_change(withdrawn)
        self.results.handshakes["drain"] = stream.finish(after=1.0)
        self.results.drain = record
        return record

    def add_lb(self, index: int) -> dict[str, Any]:
        """A new LB host while handshakes stream and the workload runs: it must take traffic."""
        stream = HandshakeStream(self)
        t0 = time.monotonic()
        node = self.topo.add_lb(index)
        announced = time.monotonic()
        stream.mark_change(announced)
        self.results.handshakes["add"] = stream.finish(after=1.5)
        record: dict[str, Any] = {"lb": index, "announced_after_s": round(announced - t0, 2)}
        deadline = time.monotonic() + 10
        while self.rx(index) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        record["rx_client_datagrams"] = self.rx(index)
        record["fallback_routed"] = self.counter(index, "quiclb_fallback_routed")
        record["probe_source"] = node.address
        self.results.add = record
        return record

    def final_counters(self) -> None:
        self.results.health_end = self.health_matrix()
        for p in self.topo.processes:
            if p.name.startswith("quiclb-"):
                lb = "lb" + p.name.removeprefix("quiclb-")
                flips = sum(" is down" in line for line in p.lines)
                self.results.health_flips[lb] = self.results.health_flips.get(lb, 0) + flips
        names = ("quiclb_rx_client_datagrams", "quiclb_fallback_routed", "quiclb_cid_routed", "quiclb_tx_to_client",
                 "quiclb_rx_backend_datagrams")
        for i in self.topo.live():
            self.results.counters[f"lb{i}"] = {n.removeprefix("quiclb_"): self.counter(i, n) for n in names}


class HandshakeStream:
    """New handshakes, one every ``period`` s, ``concurrency`` at most, until :meth:`finish`."""

    def __init__(self, driver: Driver, period: float = 0.02, concurrency: int = 12) -> None:
        self.driver = driver
        self.records: list[HandshakeRecord] = []
        self.change: float | None = None
        self._stop = asyncio.Event()
        self._future = driver.loop.submit(self._run(period, concurrency))

    async def _run(self, period: float, concurrency: int) -> None:
        sem = asyncio.Semaphore(concurrency)
        tasks = []
        while not self._stop.is_set():
            await sem.acquire()
            tasks.append(asyncio.ensure_future(self._one(sem)))
            await asyncio.sleep(period)
        await asyncio.gather(*tasks)

    async def _one(self, sem: asyncio.Semaphore) -> None:
        record = HandshakeRecord(time.monotonic(), 0.0)
        self.records.append(record)
        try:
            for attempt in (1, 2):
                record.attempts = attempt
                try:
                    client = await open_client(self.driver.cadata)
                except Exception as exc:
                    record.error = f"{type(exc).__name__}: {exc}"
                    continue
                record.error = ""
                record.local = client.local_address
                record.served_by = self.driver.oracle.owner(client.dcid)
                record.predicted = self.driver.oracle.predicted(client.local_address)
                await client.close(wait=False)
                break
        finally:
            record.ended = time.monotonic()
            sem.release()

    def mark_change(self, at: float) -> None:
        self.change = at

    def finish(self, after: float) -> dict[str, Any]:
        time.sleep(after)
        self.driver.loop.call(self._stop.set)
        self._future.result(60)
        done = [r for r in self.records if not r.error]
        in_flight = [r for r in self.records if self.change is not None and r.started <= self.change <= r.ended]
        return {
            "total": len(self.records), "completed": len(done),
            "retried": sum(r.attempts > 1 for r in self.records),
            "slow": sum(r.ended - r.started > SLOW_HANDSHAKE for r in done),
            "in_flight_at_change": len(in_flight),
            "misplaced": sum(r.served_by != r.predicted for r in done),
            "misplaced_examples": [(r.local, r.served_by, r.predicted) for r in done if r.served_by != r.predicted][:5],
            "errors": [r.error for r in self.records if r.error][:3],
        }


async def _start_downloads(clients: list[EchoClient], size: int) -> list[asyncio.Task[bool]]:
    """Start one download per client; return once every one has received data (mid-transfer)."""
    before = [c.wire.datagrams_received for c in clients]
    tasks = [asyncio.ensure_future(download(c, size, DOWNLOAD_TIMEOUT)) for c in clients]
    deadline = time.monotonic() + 10
    while any(c.wire.datagrams_received < b + 20 for c, b in zip(clients, before, strict=True)):
        if time.monotonic() > deadline or all(t.done() for t in tasks):
            break
        await asyncio.sleep(0.005)
    return tasks


async def _gather(tasks: list[asyncio.Task[bool]]) -> list[bool | BaseException]:
    return list(await asyncio.gather(*tasks, return_exceptions=True))
