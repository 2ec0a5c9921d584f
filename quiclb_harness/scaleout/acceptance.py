"""The issue-10 acceptance run, end to end: one call used by ``tests/scaleout`` and ``quiclb demo-scaleout``.

``via-lb`` (the full run), in order, with W(n, t) running throughout on
long-lived connections:

1. every LB reports every backend healthy (each probes from its own address);
2. flows spread over the three LBs (each LB's client-datagram counter moves);
   ngtcp2's client fetches through the VIP meanwhile;
3. LB host 2 stops dead mid-download (processes frozen, then kill -9): BFD;
4. a 4th LB joins while handshakes stream;
5. LB 4's quiclb process is killed -9 mid-download: the speaker's health check;
   then it is started again and re-announced;
6. LB 3 drains (SIGUSR1) while handshakes stream.

``direct`` (DSR): health and spread only, replies leave the backends from the VIP.
``run_hold_timer``: BFD off, an LB host dies; only the BGP hold timer withdraws it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from quiclb_harness.scaleout.bird import Timers
from quiclb_harness.scaleout.clients import ngtcp2_get
from quiclb_harness.scaleout.scenarios import Driver, Results
from quiclb_harness.scaleout.topology import ScaleoutTopology

NGTCP2_RUNS = 3
NGTCP2_BYTES = 512 * 1024

Progress = Callable[[str], None]


def _quiet(_line: str) -> None:
    pass


def run_via_lb(directory: Path, *, clients: int = 100, interval: float = 0.5, spread_seconds: float = 2.0,
               progress: Progress = _quiet) -> Results:
    t0 = time.monotonic()

    def step(what: str) -> None:
        progress(f"[{time.monotonic() - t0:5.1f} s] {what}")

    with ScaleoutTopology(directory / "topology", lbs=3) as topo:
        step(f"topology up: namespaces {topo.prefix}*, 3 LBs announced, router ECMP over {sorted(topo.nexthops())}")
        driver = Driver(topo)
        try:
            if not driver.wait_all_healthy():
                raise AssertionError(f"not every LB reports every backend healthy: {driver.results.health}")
            step(f"health: {driver.results.health}")
            workload, future = driver.open_workload(clients, interval, max_duration=600)
            step(f"W({clients}, {interval} s) running")
            with ThreadPoolExecutor(1) as pool:
                ngtcp2 = pool.submit(_ngtcp2, topo, directory / "ngtcp2")
                spread = driver.measure_spread(spread_seconds)
                driver.results.ngtcp2 = ngtcp2.result(120)
            step(f"spread: {spread}; ngtcp2: {driver.results.ngtcp2}")
            step(f"LB host 2 dead: {driver.kill_mid_transfer(2, host=True)}")
            step(f"LB 4 added: {driver.add_lb(4)}")
            step(f"LB 4 quiclb killed: {driver.kill_mid_transfer(4, host=False)}")
            step(f"LB 4 restarted, announced again after {driver.restart(4):.2f} s")
            step(f"LB 3 drained: {driver.drain(3)}")
            driver.final_counters()
            driver.finish_workload(workload, future)
            step(f"workload: {driver.results.workload['summary']}")
            return driver.results
        finally:
            driver.close()


def run_direct(directory: Path, *, clients: int = 30, interval: float = 0.5, progress: Progress = _quiet) -> Results:
    with ScaleoutTopology(directory / "topology-direct", lbs=3, return_mode="direct") as topo:
        driver = Driver(topo)
        try:
            driver.wait_all_healthy()
            workload, future = driver.open_workload(clients, interval, max_duration=120)
            driver.measure_spread(2.0)
            driver.final_counters()
            driver.finish_workload(workload, future)
            progress(f"direct: health {driver.results.health}; spread {driver.results.spread}; "
                     f"{driver.results.workload['summary']}")
            return driver.results
        finally:
            driver.close()


def run_hold_timer(directory: Path, *, clients: int = 30, interval: float = 0.5,
                   progress: Progress = _quiet) -> Results:
    """Without BFD: an LB host stops dead and only the BGP hold timer withdraws it (why BFD is on)."""
    with ScaleoutTopology(directory / "topology-hold", lbs=3, timers=Timers(bfd=False)) as topo:
        driver = Driver(topo)
        try:
            workload, future = driver.open_workload(clients, interval, max_duration=120)
            record = driver.kill_mid_transfer(2, host=True, downloads=2)
            driver.finish_workload(workload, future)
            progress(f"without BFD: {record}; {driver.results.workload['summary']}")
            return driver.results
        finally:
            driver.close()


def _ngtcp2(topo: ScaleoutTopology, directory: Path) -> dict[str, object]:
    runs = [ngtcp2_get(topo.client, directory / str(i), NGTCP2_BYTES) for i in range(NGTCP2_RUNS)]
    return {"runs": len(runs), "ok": sum(ok for ok, _, _ in runs), "served_by": [s for _, s, _ in runs],
            "bytes": NGTCP2_BYTES}
