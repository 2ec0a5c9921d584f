"""The process that builds Maglev rings, so that a build never pauses the datapath.

A 65537-slot ring costs 15-30 ms of pure Python. On the event loop that is a
datapath stall per health flap; in a thread it still holds the GIL the loop
needs (``bench/control_plane_pause.py``: tens of ms of pause either way). In
one spawned worker process the loop only unpickles the result (about 0.1 ms
per ring). Spawned, not forked: the LB's process has threads (uvloop, the
executor's own), and forking those is unsafe. Niced: on a busy host the
datapath wins the CPU over a background build.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing import get_context

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: How much lower than the LB the worker runs (nice increment).
WORKER_NICENESS = 10


def ring_executor() -> Executor:
    """One worker process; rings are built one at a time (a flap storm queues, it does not fork more)."""
    return ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), initializer=_init_ring_worker,
                               initargs=(os.getpid(),))


def _init_ring_worker(lb_pid: int) -> None:
    os.nice(WORKER_NICENESS)
    # The pool's queues keep both pipe ends in the worker, so it never sees EOF when the LB is
    # killed (-9): ask Linux to kill it with its parent instead, and catch a parent already gone.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != lb_pid:
        os._exit(0)
