"""The LB builds Maglev rings in a spawned worker process: it must never outlive the LB, even after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec
from quiclb_harness.processes import start_lb
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
