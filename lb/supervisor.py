"""The ``quiclb run --workers N`` supervisor: N LB processes sharing their sockets.

Stateless routing makes this safe: the kernel spreads datagrams over the
workers by 4-tuple and each decides exactly as the others would. Workers are
started one after the other, each awaited on its ``WORKER-READY`` line for at
most ``ready_timeout`` seconds; a worker that is not ready in time is killed and
the supervisor stops the others and exits 1 (one ``quiclb: error:`` line).
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import subprocess
import sys
import time

EXIT_OK, EXIT_FAIL = 0, 1
#: Worker crashes a supervisor absorbs before it gives up.
MAX_WORKER_RESTARTS = 10
WORKER_POLL_SECONDS = 0.2


def supervise(worker_argv: list[str], workers: int, ready_timeout: float) -> int:
    """``--workers N``: N LB processes in one SO_REUSEPORT group; only the first serves the admin API.

    Stateless routing makes this safe: the kernel spreads datagrams over the
    workers by 4-tuple and each decides exactly as the others would. SIGHUP,
    SIGTERM and SIGINT are passed on to every worker. The supervisor prints its
    own READY line once every worker is ready; a worker that dies later is
    restarted (at most MAX_WORKER_RESTARTS times), since no state dies with it.
    """
    base = [*worker_argv, "--worker"]  # --worker: joins its siblings' sockets
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def relay(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Handlers first: a signal during start-up must reach every worker started so far.
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, relay)

    def spawn(index: int) -> subprocess.Popen[bytes]:
        argv = base + ([] if index == 0 else ["--no-admin"])
        # The supervisor is single-threaded, so preexec_fn is safe here.
        return subprocess.Popen(argv, stdout=subprocess.PIPE, preexec_fn=_exit_with_parent)  # noqa: PLW1509

    def wait_ready(p: subprocess.Popen[bytes]) -> str | None:
        """The worker's READY fields, or None if it died or was not ready in time (then it is killed)."""
        line = read_ready_line(p, time.monotonic() + ready_timeout)
        if line is None and p.poll() is None:
            print(f"quiclb: error: worker {p.pid} not ready within {ready_timeout:g} s "
                  "(--ready-timeout); stopping", file=sys.stderr, flush=True)
            p.kill()
        return line

    ready: list[str] = []
    for i in range(workers):
        if stopping:
            break
        procs.append(spawn(i))
        line = wait_ready(procs[-1])
        if line is None:
            break
        ready.append(line)
    if len(ready) != workers or stopping:
        relay(signal.SIGTERM, None)
        for p in procs:
            p.wait()
        return EXIT_FAIL
    fields = dict(tok.split("=", 1) for tok in ready[0].split())
    print(f"READY pid={os.getpid()} workers={','.join(str(p.pid) for p in procs)} inside={fields['inside']} "
          f"vips={fields['vips']} admin={fields['admin']}", flush=True)
    restarts = 0
    failed = False
    while not stopping:
        for i, p in enumerate(procs):
            if stopping or p.poll() is None:
                continue
            restarts += 1
            print(f"quiclb: worker {p.pid} exited with {p.returncode}; restarting it "
                  f"({restarts}/{MAX_WORKER_RESTARTS})", file=sys.stderr, flush=True)
            if p.stdout is not None:
                p.stdout.close()
            if restarts > MAX_WORKER_RESTARTS:
                failed = True
                relay(signal.SIGTERM, None)
                break
            procs[i] = spawn(i)
            if wait_ready(procs[i]) is None:
                failed = True
                relay(signal.SIGTERM, None)
        time.sleep(WORKER_POLL_SECONDS)  # a signal cuts it short; the handler relays it
    failed = any(p.wait() != 0 for p in procs) or failed
    for p in procs:
        if p.stdout is not None:
            p.stdout.close()
    return EXIT_FAIL if failed else EXIT_OK


def read_ready_line(p: subprocess.Popen[bytes], deadline: float) -> str | None:
    """Read ``p``'s stdout until its ``WORKER-READY`` line (fields returned), EOF or ``deadline``.

    Other lines are passed through to our stdout. Reads the pipe without
    blocking past the deadline, so a worker that hangs at start cannot hang us.
    """
    assert p.stdout is not None
    fd = p.stdout.fileno()
    pending = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            while b"\n" in pending:
                raw, pending = pending.split(b"\n", 1)
                line = raw.decode("utf-8", "replace")
                if line.startswith("WORKER-READY"):
                    return line.split(maxsplit=1)[1].strip()
                sys.stdout.write(line + "\n")
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # EOF: it died before it was ready
            pending += chunk


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _exit_with_parent() -> None:
    """In a worker, before exec: SIGTERM when the supervisor dies, even by SIGKILL.

    Without it a supervisor killed with -9 left its workers serving the VIP (and holding
    its port) with nobody to stop them. Linux only; elsewhere workers outlive a killed
    supervisor as before.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass

