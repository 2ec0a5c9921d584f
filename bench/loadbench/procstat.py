"""What the kernel says about processes: trees, CPU time, RSS, pinning, and UDP socket drops.

CPU time is read per thread from /proc/PID/task/TID/schedstat (first field:
nanoseconds on CPU), summed over the target's whole process tree (nginx's
workers, quiclb --workers' children). That is exact to the nanosecond, where
utime+stime in /proc/PID/stat moves in 10 ms ticks; both are recorded, the
ticks as a cross-check. Time spent in softirq on behalf of a socket may be
charged to whichever task was running (on loopback usually the sender), the
same way for every target, which is why targets are compared in the same run.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICK_SECONDS = 1 / os.sysconf("SC_CLK_TCK")
#: The CPUs this run may use, read before the orchestrator pins itself to the load CPU.
ALLOWED_CPUS = frozenset(os.sched_getaffinity(0))


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc/*/stat (field 4 = parent PID)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a process from a later one that reuses its PID."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class CpuSample:
    """CPU consumed so far by a process tree: schedstat nanoseconds and utime+stime ticks."""

    ns: int
    ticks: int
    pids: int
    #: Times a thread of the tree was scheduled in (schedstat's third field): its wakeups, roughly.
    slices: int = 0


def cpu_sample(pid: int) -> CpuSample:
    """Sum of every thread's time on CPU in ``pid``'s tree (threads that already exited are not seen)."""
    ns = ticks = slices = 0
    pids = process_tree(pid)
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of the full line
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = Path(f"/proc/{p}/task/{tid}/schedstat").read_text().split()
                    ns += int(stat[0])
                    slices += int(stat[2])
    return CpuSample(ns, ticks, len(pids), slices)


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid``'s whole tree, from /proc/PID/status (kB)."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def pin_tree(pid: int, cpu: int | None) -> None:
    """Pin every thread of ``pid`` and of its children to ``cpu`` (sched_setaffinity is per thread).

    ``None`` gives them every allowed CPU back: children inherit the orchestrator's affinity, which
    is the load CPU once the run is pinned, and an unpinned target (--workers 2) must not stay there.
    """
    cpus = set(ALLOWED_CPUS) if cpu is None else {cpu}
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


def udp_drops() -> dict[int, int]:
    """Kernel receive-queue drops per local UDP port (/proc/net/udp), summed over sockets."""
    drops: dict[int, int] = {}
    with contextlib.suppress(OSError), open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            port = int(cols[1].rsplit(":", 1)[1], 16)
            drops[port] = drops.get(port, 0) + int(cols[12])
    return drops


def cpu_busy_ns(cpu: int | None) -> int:
    """Busy time of one CPU (all but idle and iowait) from /proc/stat, in ns; 0 when ``cpu`` is None.

    Minus the target's own time this is what *other* tasks and interrupts took from the target's CPU
    during a step: the shared machine's noise, recorded so a reader can discount a disturbed step.
    """
    if cpu is None:
        return 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                return int((sum(v[:8]) - v[3] - v[4]) * CLOCK_TICK_SECONDS * 1e9)  # drop idle and iowait
    return 0


def kernel_drops() -> dict[str, int]:
    """Drops outside any one socket's counter: the per-CPU input backlog (softnet_stat column 2, which
    overflows when the sending CPU cannot deliver fast enough on loopback) and UDP receive-buffer errors."""
    out = {"softnet_dropped": 0, "udp_rcvbuf_errors": 0}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/net/softnet_stat").read_text().splitlines():
            out["softnet_dropped"] += int(line.split()[1], 16)
    with contextlib.suppress(OSError, ValueError, IndexError):
        rows = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Udp:")]
        out["udp_rcvbuf_errors"] = int(rows[1][rows[0].index("RcvbufErrors")])
    return out


def choose_cpus(no_pin: bool) -> tuple[int | None, int | None]:
    """(target CPU, load CPU): 0 and 1 when both are allowed, else no pinning."""
    if no_pin or not {0, 1} <= ALLOWED_CPUS:
        return None, None
    return 0, 1
