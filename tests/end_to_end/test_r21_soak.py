"""R-21 soak (acceptance.md §2.2): a random fault on a schedule under W(n, t), through real processes.

Faults: LB kill -9 + restart, backend added or removed (config rewrite + SIGHUP), NAT
rebinding of a third of the connections (:mod:`quiclb_harness.soak`). Pass: 0 connections
lost except those on a removed backend; the LB's RSS stays within 10 MB and its open fds do
not grow; the backends' RSS stays flat after warm-up while short connections keep finishing
on them (issue 13 item 4). CI runs 2 minutes of W(100, 0.5 s) with a fault every 15 s;
``make soak`` runs the opt-in 30 minutes of W(1000, 2 s) with a fault every 30 s.
``QUICLB_SOAK_SEED`` replays a run (every run prints its seed).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import uvloop

from quiclb_harness.quic_cluster import QuicCluster
from quiclb_harness.soak import FAULTS, Reading, Soak, SoakPlan, SoakReport
from quiclb_harness.workload import RequestResult, WorkloadReport

SEED = int(os.environ.get("QUICLB_SOAK_SEED", "2121"))
#: RSS band (acceptance R-21: within 10 MB) and the backends' allowance after warm-up.
RSS_BAND_KB = 10 * 1024
#: Memory of one live connection on an aioquic backend, with margin (about 80 kB measured).
LIVE_CONNECTION_KB = 100


def run_soak(tmp_path: Path, plan: SoakPlan) -> SoakReport:
    cluster = QuicCluster(tmp_path)
    try:
        cluster.start()
        soak = Soak(cluster, plan, log=lambda line: print(line, flush=True))
        # uvloop, like the LB and the backends: W(1000, 2 s) in one asyncio client process took
        # ~55% of a core on the 2-core reference machine, and the burst of retransmissions after a
        # kill -9 of the LB then saturated both cores for good (timers late -> spurious PTOs -> more
        # packets); at ~45% the client has the slack to recover (0 lost, quiclb_harness/soak.py).
        return uvloop.run(asyncio.wait_for(soak.run(), plan.duration + 180))
    finally:
        cluster.close()


def after_warm_up(readings: list[Reading], plan: SoakPlan) -> list[Reading]:
    return [r for r in readings if r.at >= plan.warm_up]


def check(report: SoakReport) -> None:
    plan = report.plan
    assert report.workload is not None
    where = f"seed={plan.seed}; faults={report.faults}; {report.workload.summary()}"
    assert not report.lost, f"{len(report.lost)} connections lost outside removed backends; {where}"
    # The workload kept its schedule (a stalled generator would hide losses).
    assert len(report.workload.results) >= 0.95 * plan.connections * plan.duration / plan.interval, where
    attempted = report.churn_ok + report.churn_failed
    assert report.churn_ok >= 0.9 * attempted, f"short connections: {report.churn_ok}/{attempted}; {where}"
    lb = after_warm_up(report.lb_readings, plan)
    assert len(lb) >= 2, where
    rss = [r.rss_kb for r in lb]
    assert max(rss) - min(rss) <= RSS_BAND_KB, f"LB RSS readings {rss} kB; {where}"
    # Per LB instance (restarts change the PID): never more fds than at its first reading.
    first_fds: dict[int, int] = {}
    for r in lb:
        first_fds.setdefault(r.pid, r.fds)
        assert r.fds <= first_fds[r.pid], f"LB {r.pid} fds grew: {[x.fds for x in lb]}; {where}"
    for sid, readings in report.backend_readings.items():
        settled = after_warm_up(readings, plan)
        if len(settled) >= 2:
            # Connections replacing those of removed backends move onto the others, and a live
            # aioquic connection holds ~80 kB (measured in a 30-minute run): that growth is live
            # memory. What must not grow is memory per *finished* connection (issue 13 item 4:
            # ~14 kB each, ~25 MB per backend over 30 minutes of churn).
            added = max(0, settled[-1].connections - settled[0].connections)
            allowance = RSS_BAND_KB + LIVE_CONNECTION_KB * added
            growth = settled[-1].rss_kb - settled[0].rss_kb
            assert growth <= allowance, (
                f"backend {sid} RSS grew {growth} kB after warm-up, {added} more live connections "
                f"(allowance {allowance} kB); {where}"
            )


def test_r21_soak_ci(tmp_path: Path) -> None:
    plan = SoakPlan(duration=120, fault_every=15, connections=100, interval=0.5, seed=SEED,
                    churn_per_second=2, warm_up=20)
    report = run_soak(tmp_path, plan)
    check(report)
    assert {kind for _, kind, _ in report.faults} == set(FAULTS), report.faults


@pytest.mark.optin
def test_r21_soak_30_minutes(tmp_path: Path) -> None:
    duration = float(os.environ.get("QUICLB_SOAK_SECONDS", "1800"))
    plan = SoakPlan(duration=duration, fault_every=30, connections=1000, interval=2.0, seed=SEED,
                    churn_per_second=4, warm_up=120)
    check(run_soak(tmp_path, plan))


def test_only_requests_made_on_a_replaced_connection_are_exempt() -> None:
    """A replaced connection's failures are exempt whenever they were sent; its replacement's count.

    The time-based rule this replaces counted a request sent in the same loop iteration as the
    replacement (same loop time) on the old connection as lost: the 2-minute soak failed in CI.
    """
    old, new = object(), object()
    workload = WorkloadReport(connections=2, interval=0.5, results=[
        RequestResult(0, 120, 60.0, None, "ClientError: connection closed", id(old)),
        RequestResult(0, 121, 60.5, 0.001, "", id(new)),
        RequestResult(1, 120, 60.0, None, "ClientError: timed out", id(new)),
    ])
    report = SoakReport(plan=SoakPlan(duration=1, fault_every=1, connections=2, interval=0.5, seed=1),
                        workload=workload, retired={id(old)})
    assert report.lost == {1}
