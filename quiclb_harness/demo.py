"""``quiclb demo``: one LB and three aioquic backends on loopback, real QUIC clients, a report.

What it does, in under a minute:

1. writes a fresh deployment (new AES-128 keys from ``secrets``, a self-signed
   certificate, single-pass QUIC-LB CIDs of 17 bytes) into a work directory;
2. starts three ``quiclb-backend`` processes and one ``quiclb run`` process;
3. drives HTTP/3 clients through the VIP: handshake (the LB's keyed fallback
   picks a backend), ``GET /`` (the page names the backend that served it),
   then echo after a CID change, a NAT rebinding (new port), an active
   migration (new address 127.0.0.2 and new CID), and a kill -9 of the LB
   while every client is in the middle of a download (``GET /bytes/N``),
   restarted with nothing handed over: the downloads finish on the same
   connections;
4. prints what went where and which promises held, and exits 0 only if all did.

Every CID a backend issues is decoded with the LB's own decoder and compared
with the server ID in the page the client got: the proof does not trust the
CIDs to say who served.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lb.core.cid_config import CidConfig
from lb.core.cid_decoder import decode_server_id
from quiclb_harness.admin_client import metric_sum
from quiclb_harness.quic_cluster import QuicCluster

if TYPE_CHECKING:
    from backends.client import EchoClient

CLIENTS = 24  # with 3 backends, P(a backend gets no handshake) = 3 * (2/3)^24 < 0.03%
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]
REQUEST_TIMEOUT = 5.0
#: Bytes each client downloads across the LB's kill -9: long enough to be in flight at the kill.
DOWNLOAD_BYTES = 256 * 1024
#: A download spans the LB's restart (about a second) and QUIC's loss recovery after it.
DOWNLOAD_TIMEOUT = 15.0


@dataclass
class ClientReport:
    index: int
    served_by: str = "?"  # from the page: independent of the CIDs
    cid_owner: set[str] = field(default_factory=set)  # server IDs decoded from every CID it received/sent
    cids_issued: int = 0
    steps: dict[str, str] = field(default_factory=dict)  # step -> served_by after it (or "FAILED: ...")
    error: str | None = None

    @property
    def kept_backend(self) -> bool:
        return self.error is None and all(v == self.served_by for v in self.steps.values())


async def _served_by(client: object) -> str:
    response = await client.request("GET", "/", timeout=REQUEST_TIMEOUT)  # type: ignore[attr-defined]
    if response.status != 200:
        raise RuntimeError(f"GET / answered {response.status}")
    return str(response.headers.get("x-quiclb-server-id", "?"))


async def _echo_check(client: object, payload: bytes) -> None:
    response = await client.request("POST", "/echo", payload, timeout=REQUEST_TIMEOUT)  # type: ignore[attr-defined]
    if response.body != payload:
        raise RuntimeError("echo mismatch")


@dataclass
class KillReport:
    gap: float = 0.0  # seconds from kill -9 to the new LB's READY
    downloads: int = 0  # downloads started before the kill
    in_flight: int = 0  # of them, still unfinished when the LB was killed
    completed: int = 0  # of them, finished intact on their original connection


async def _download(client: EchoClient) -> bool:
    response = await client.request("GET", f"/bytes/{DOWNLOAD_BYTES}", timeout=DOWNLOAD_TIMEOUT)
    return response.status == 200 and len(response.body) == DOWNLOAD_BYTES


async def _kill_during_downloads(
    cluster: QuicCluster, clients: list[EchoClient | None], reports: list[ClientReport]
) -> KillReport:
    """Start a download on every client, kill -9 the LB once all requests are on the wire, restart it."""
    loop = asyncio.get_running_loop()
    live = {i: c for i, c in enumerate(clients) if c is not None and reports[i].error is None}
    sent_before = {i: c.wire.datagrams_sent for i, c in live.items()}
    tasks = {i: asyncio.ensure_future(_download(c)) for i, c in live.items()}
    deadline = loop.time() + REQUEST_TIMEOUT
    # Bounded wait until every client has sent its request: then the LB is killed mid-transfer.
    while any(c.wire.datagrams_sent == sent_before[i] for i, c in live.items()) and loop.time() < deadline:
        await asyncio.sleep(0.001)
    lb = cluster.live_lbs()[0]
    killed_at = time.monotonic()
    in_flight = sum(not t.done() for t in tasks.values())
    lb.signal(signal.SIGKILL)  # synchronously: no reply is processed between the count and the kill
    await loop.run_in_executor(None, cluster.restart_lb, lb)
    report = KillReport(gap=time.monotonic() - killed_at, downloads=len(tasks), in_flight=in_flight)
    for i, task in tasks.items():
        try:
            ok = await task
        except Exception as exc:  # report, never crash the demo: this is the result
            reports[i].error = f"download across LB kill -9: {exc}"
            continue
        if ok:
            report.completed += 1
        else:
            reports[i].error = "download across LB kill -9: wrong status or length"
    return report


async def _drive(cluster: QuicCluster, cfg: CidConfig) -> tuple[list[ClientReport], KillReport, Metrics]:
    from backends.client import EchoClient  # noqa: PLC0415 - aioquic only for the demo

    vip = cluster.dep.vip()
    reports = [ClientReport(i + 1) for i in range(CLIENTS)]
    clients: list[EchoClient | None] = [None] * CLIENTS

    async def step(i: int, name: str, action: str) -> None:
        r, c = reports[i], clients[i]
        if r.error is not None or c is None:
            return
        try:
            if action == "cid":
                c.change_cid()
            elif action == "rebind":
                await c.rebind()
            elif action == "migrate":
                await c.migrate("127.0.0.2")
            await _echo_check(c, f"{name} from client {i + 1}".encode())
            r.steps[name] = await _served_by(c)
        except Exception as exc:  # report, never crash the demo: this is the result
            r.error = f"{name}: {exc}"

    async def open_client(i: int) -> None:
        try:
            c = await EchoClient.open(*vip, alpn="h3", cadata=cluster.cert_pem, timeout=REQUEST_TIMEOUT)
            clients[i] = c
            reports[i].served_by = await _served_by(c)
        except Exception as exc:
            reports[i].error = f"handshake: {exc}"

    await asyncio.gather(*(open_client(i) for i in range(CLIENTS)))
    for name, action in (("CID change", "cid"), ("NAT rebinding", "rebind"), ("migration", "migrate")):
        await asyncio.gather(*(step(i, name, action) for i in range(CLIENTS)))
    # The LB dies hard in the middle of every client's download; a fresh process takes over with
    # no state handed over, and the downloads finish on their connections.
    loop = asyncio.get_running_loop()
    before = await loop.run_in_executor(None, cluster.lb_metrics)
    killed = await _kill_during_downloads(cluster, clients, reports)
    await asyncio.gather(*(step(i, "after LB kill -9", "") for i in range(CLIENTS)))
    for i, c in enumerate(clients):
        if c is None:
            continue
        r = reports[i]
        cids = list(c.wire.server_cids.values()) + list(c.wire.sent_short_dcids)
        r.cids_issued = len(c.wire.server_cids)
        r.cid_owner = {(decode_server_id(cfg, x) or b"\xff\xff").hex() for x in cids}
        await c.close(wait=False)
    return reports, killed, before



def _print_counters(title: str, samples: Metrics, sids: list[str]) -> tuple[float, float, float, float]:
    rx = metric_sum(samples, "quiclb_rx_client_datagrams_total")
    routed = metric_sum(samples, "quiclb_cid_routed_total")
    fallback = metric_sum(samples, "quiclb_fallback_routed_total")
    dropped = sum(v for (n, _), v in samples.items() if n.endswith("_dropped_total"))
    print(f"\n{title}")
    print(f"  datagrams received {rx:.0f} = CID-routed {routed:.0f} + fallback {fallback:.0f} + dropped {dropped:.0f}")
    for sid in sids:
        by_cid = metric_sum(samples, "quiclb_cid_routed_total", backend=sid)
        sent = metric_sum(samples, "quiclb_tx_to_backend_total", backend=sid)
        print(f"  backend {sid}: CID-routed {by_cid:.0f}, by fallback (handshakes) {sent - by_cid:.0f}")
    return rx, routed, fallback, dropped


def _print_report(cluster: QuicCluster, reports: list[ClientReport], killed: KillReport, before: Metrics) -> bool:
    out = sys.stdout
    sids = cluster.server_ids
    print("\nWhat went where (backend = server ID on the page each request got):", file=out)
    steps = ["CID change", "NAT rebinding", "migration", "after LB kill -9"]
    print(f"  {'client':>6}  {'handshake':>9}  {'CIDs':>4}  {'CIDs decode to':>14}  "
          + "  ".join(f"{s:>16}" for s in steps), file=out)
    for r in reports:
        decoded = ",".join(sorted(r.cid_owner)) or "-"
        cells = [r.steps.get(s, "-") for s in steps]
        line = (f"  {r.index:>6}  {r.served_by:>9}  {r.cids_issued:>4}  {decoded:>14}  "
                + "  ".join(f"{c:>16}" for c in cells))
        print(line + (f"   ERROR {r.error}" if r.error else ""), file=out)

    sums = [_print_counters("The first LB's counters, read before the downloads it died in:", before, sids)]
    sums.append(_print_counters("The restarted LB's counters (it only saw traffic after the restart):",
                                cluster.lb_metrics(), sids))
    unknown = {sid: int(b.stats()["unknown_cid_packets"]) for sid, b in cluster.backends.items()}
    share = Counter(r.served_by for r in reports)

    ok = [r for r in reports if r.error is None]
    promises = [
        ("every client completed its handshake and requests", len(ok) == len(reports)),
        ("every CID a backend issued decodes (LB decoder) to the backend that served it",
         all(r.cid_owner == {r.served_by} for r in ok) and bool(ok)),
        ("connections spread over all backends by the keyed fallback", set(share) == set(sids)),
        ("CID changes, NAT rebinding and migration kept every connection on its backend",
         all(r.kept_backend for r in ok) and bool(ok)),
        (f"LB kill -9 with {killed.in_flight} of {killed.downloads} downloads ({DOWNLOAD_BYTES // 1024} KB) in "
         f"flight + restart ({killed.gap * 1000:.0f} ms gap): all finished, no connection lost, no new handshake",
         killed.in_flight > 0 and killed.completed == killed.downloads == len(reports)
         and all("after LB kill -9" in r.steps for r in reports) and sums[1][2] == 0),
        ("no datagram reached a backend that did not own its CID (unknown-CID counters 0)",
         all(v == 0 for v in unknown.values())),
        ("LB counters add up: received = routed + fallback + dropped",
         all(rx == routed + fallback + dropped for rx, routed, fallback, dropped in sums)),
    ]
    print("\nPromises:", file=out)
    for text, held in promises:
        print(f"  [{'PASS' if held else 'FAIL'}] {text}", file=out)
    return all(held for _, held in promises)


def run_demo(workdir: Path | None = None, keep: bool = False) -> int:
    started = time.monotonic()
    logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic's per-connection INFO lines drown the report
    directory = workdir or Path(tempfile.mkdtemp(prefix="quiclb-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"quiclb demo: work directory {directory}")
    cluster = QuicCluster(directory)
    try:
        cluster.start()
        key = cluster.dep.key("echo", 0)
        cfg = CidConfig(0, 2, 14, key)
        lb = cluster.live_lbs()[0]
        print(f"  load balancer pid {lb.pid}: VIP {cluster.dep.vip()[0]}:{cluster.dep.vip()[1]}, "
              f"inside {cluster.dep.inside[0]}:{cluster.dep.inside[1]}")
        for sid, b in cluster.backends.items():
            print(f"  backend {sid} pid {b.process.pid}: {b.process.wait_ready()['address']}")
        print(f"  QUIC-LB config 0: {cfg.mode.value} AES-128 (fresh key), server ID 2 bytes, "
              f"nonce 14 bytes, CIDs of {cfg.cid_len} bytes")
        print(f"  {CLIENTS} HTTP/3 clients (aioquic) connect through the VIP ...")
        reports, killed, before = asyncio.run(_drive(cluster, cfg))
        held = _print_report(cluster, reports, killed, before)
    finally:
        cluster.close()
        if not keep and workdir is None:
            shutil.rmtree(directory, ignore_errors=True)
    print(f"\n{'All promises held' if held else 'SOME PROMISES FAILED'} "
          f"({time.monotonic() - started:.1f} s).")
    return 0 if held else 1
