"""``python -m lb`` with the batched forward path timed, for bench/wakeup_profile.py (not for production).

Wraps, before the LB starts, ``MmsgVipPort.readable`` (one call per wakeup of a
VIP socket) and the two cffi calls it makes, and at exit writes to the file
named by ``QUICLB_TIMING_OUT`` (JSON), counted from the first wakeup on:

- ``wakeups``, ``batches``, ``datagrams``;
- ``recvmmsg_ns``, ``sendmmsg_ns``: wall time inside the two system calls;
- ``readable_ns``, ``readable_cpu_ns``: wall and thread CPU time inside ``readable``;
- ``process_cpu_ns``: the whole process's CPU time (every thread) over the same span.

The wrappers add about 0.1-0.2 µs per call of their own; the script reports
CPU per datagram with and without them.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from typing import Any

from lb.adapters import mmsg
from lb.adapters.mmsg_forward import MmsgVipPort
from lb.cli import main

COUNTS = {"wakeups": 0, "batches": 0, "datagrams": 0, "recvmmsg_ns": 0, "sendmmsg_ns": 0, "readable_ns": 0,
          "readable_cpu_ns": 0}
_start_cpu: list[int] = []


def _install() -> None:
    libc = mmsg.LIBC
    assert libc is not None, "the batched datapath needs Linux"
    real_recv, real_send, real_readable = libc.recvmmsg, libc.sendmmsg, MmsgVipPort.readable
    clock, cpu = time.perf_counter_ns, time.thread_time_ns
    counts = COUNTS

    def recvmmsg(*args: Any) -> int:
        t = clock()
        n = int(real_recv(*args))
        counts["recvmmsg_ns"] += clock() - t
        if n > 0:
            counts["batches"] += 1
            counts["datagrams"] += n
        return n

    def sendmmsg(*args: Any) -> int:
        t = clock()
        n = int(real_send(*args))
        counts["sendmmsg_ns"] += clock() - t
        return n

    def readable(self: MmsgVipPort) -> None:
        if not _start_cpu:
            _start_cpu.append(time.process_time_ns())
        c, t = cpu(), clock()
        real_readable(self)
        counts["readable_ns"] += clock() - t
        counts["readable_cpu_ns"] += cpu() - c
        counts["wakeups"] += 1

    libc.recvmmsg, libc.sendmmsg = recvmmsg, sendmmsg
    MmsgVipPort.readable = readable  # type: ignore[method-assign]  # before any port registers it


def _write() -> None:
    path = os.environ.get("QUICLB_TIMING_OUT")
    if path:
        doc = dict(COUNTS, process_cpu_ns=time.process_time_ns() - _start_cpu[0] if _start_cpu else 0)
        with open(path, "w") as f:
            json.dump(doc, f)


if __name__ == "__main__":
    _install()
    atexit.register(_write)
    sys.exit(main())
