"""The LB's start-up and its ring worker process (spawned at start to build Maglev rings off the loop).

- The worker never outlives the LB, even after kill -9.
- A SIGHUP while the LB is starting (its handlers are installed first) does not kill it: the
  reload runs right after the start (issue 12 item 4). The worker's appearance marks "starting".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from quiclb_harness.admin_client import metric_sum, scrape
from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec
from quiclb_harness.processes import ManagedProcess, start_lb
from quiclb_harness.waiting import wait_until


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def test_the_ring_worker_dies_with_a_killed_lb(tmp_path: Path) -> None:
    dep = Deployment(directory=tmp_path, admin=False, services=[ServiceSpec(backends=[BackendSpec("0001")])])
    dep.write()
    lb = start_lb(dep.path)
    lb.wait_ready()
    workers = _children(lb.pid)
    assert workers, "the LB has no ring worker process"
    os.kill(lb.pid, signal.SIGKILL)
    wait_until(lambda: not any(os.path.exists(f"/proc/{w}") for w in workers), 5.0, "ring workers gone")
    lb.kill()


def test_a_sighup_during_start_is_a_reload_applied_after_it(tmp_path: Path) -> None:
    # 16 services: the start builds 16 rings in the worker, long enough to signal in the middle of it.
    dep = Deployment(directory=tmp_path, services=[
        ServiceSpec(name=f"svc{i}", backends=[BackendSpec("0001"), BackendSpec("0002")]) for i in range(16)
    ])
    dep.write()
    lb = ManagedProcess([sys.executable, "-m", "lb", "run", "-c", str(dep.path)], name="quiclb")  # not yet READY
    wait_until(lambda: bool(_children(lb.pid)) or not lb.alive(), 20.0, "the start's first ring build")
    assert lb.ready_line is None, "the start was over before the signal"
    lb.signal(signal.SIGHUP)
    host, port = lb.wait_ready()["admin"].rsplit(":", 1)
    assert lb.alive()
    wait_until(lambda: metric_sum(scrape((host, int(port)), dep.token), "quiclb_config_reloads_total") == 1,
               10.0, "the reload requested during start")
    lb.stop()
