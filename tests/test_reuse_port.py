"""SO_REUSEPORT groups are joined on purpose only (issue 12 item 11).

A VIP (or the inside address) already held by another socket - a stale LB of
the same user in an SO_REUSEPORT group, or any other program - is refused with
one line and exit 1; ``run --reuse-port`` joins a running group on purpose
(scale-out, rolling restart), and ``--workers`` still shares its own sockets.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec
from quiclb_harness.processes import ManagedProcess, start_lb
from quiclb_harness.waiting import wait_until

#: Today's code joins the group and runs until killed: a bounded wait turns that into a failure.
EXIT_TIMEOUT = 20.0


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    d = Deployment(tmp_path, [ServiceSpec(backends=[BackendSpec("0001")])], admin=False)
    d.write()
    return d


@pytest.fixture
def running() -> Iterator[list[ManagedProcess]]:
    procs: list[ManagedProcess] = []
    yield procs
    for p in procs:
        p.kill()


def run_to_exit(dep: Deployment, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lb", "run", "-c", str(dep.path), *extra],
                          capture_output=True, text=True, timeout=EXIT_TIMEOUT, check=False)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("quiclb: error:")]


def squatter(address: tuple[str, int]) -> socket.socket:
    """What a stale LB leaves behind: a socket in an SO_REUSEPORT group on the address."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(address)
    return s


@pytest.mark.parametrize("held", ["vip", "inside"])
def test_an_address_held_by_a_stale_reuseport_socket_is_refused(dep: Deployment, held: str) -> None:
    address = dep.vip() if held == "vip" else dep.inside
    with squatter(address):
        result = run_to_exit(dep)
    [line] = error_lines(result)
    assert result.returncode == 1
    assert f"127.0.0.1:{address[1]}" in line and "already in use" in line and "--reuse-port" in line


def test_a_second_lb_on_the_same_config_is_refused_and_the_first_keeps_serving(
    dep: Deployment, running: list[ManagedProcess]
) -> None:
    first = start_lb(dep.path)
    running.append(first)
    result = run_to_exit(dep)
    [line] = error_lines(result)
    assert result.returncode == 1 and "already in use" in line
    assert first.alive()


def test_reuse_port_joins_a_running_group_on_purpose(dep: Deployment, running: list[ManagedProcess]) -> None:
    running.append(start_lb(dep.path))
    second = start_lb(dep.path, "--reuse-port")  # READY: both instances are bound to the VIP
    running.append(second)
    assert second.wait_ready()["vips"] == f"127.0.0.1:{dep.vip()[1]}"


def test_workers_share_their_sockets_but_refuse_a_stale_group(dep: Deployment, running: list[ManagedProcess]) -> None:
    with squatter(dep.vip()):
        result = run_to_exit(dep, "--workers", "2")
    [line] = error_lines(result)
    assert result.returncode == 1 and "already in use" in line
    supervisor = start_lb(dep.path, "--workers", "2")  # its own two workers do share the VIP
    running.append(supervisor)
    assert len(supervisor.wait_ready()["workers"].split(",")) == 2


def test_workers_exit_when_their_supervisor_is_killed(dep: Deployment, running: list[ManagedProcess]) -> None:
    # A supervisor killed with -9 cannot pass SIGTERM on: the workers must still stop (they were
    # left serving the VIP, and holding its port, with nobody to stop them).
    supervisor = start_lb(dep.path, "--workers", "2")
    running.append(supervisor)
    workers = [int(pid) for pid in supervisor.wait_ready()["workers"].split(",")]
    supervisor.kill()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone too: it only waits for its reaper
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"

    wait_until(lambda: all(gone(pid) for pid in workers), 10.0, "workers of a killed supervisor exit")
