"""Start and stop quiclb processes for tests, benchmarks and the demo.

Every process is started by us, waited for on its ``READY`` line (never a
sleep), and stopped by PID. Output is drained by a thread into a bounded
buffer so a chatty process can never block on a full pipe.
"""

from __future__ import annotations

import atexit
import collections
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

READY_TIMEOUT = 20.0

# Every live child, so that an interpreter exit (a crashed test run, an
# exception in the demo) never leaves an orphan LB or backend running.
_LIVE: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for p in list(_LIVE):
        if p.alive():
            p.proc.kill()


class ProcessError(RuntimeError):
    """A managed process failed to start or died."""


class ManagedProcess:
    """A child process that announces readiness with a line starting ``READY``."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, name: str = "") -> None:
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, text=True, bufsize=1
        )
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)
        self.ready_line: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._drain, name=f"drain-{self.name}", daemon=True)
        self._reader.start()
        _LIVE.add(self)

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            self.lines.append(line)
            if self.ready_line is None and line.startswith("READY"):
                self.ready_line = line
                self._ready.set()
        self._ready.set()  # EOF: wake waiters so they see the process died

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, str]:
        """Block until the READY line (returned as key=value pairs); raise if the process dies first."""
        if not self._ready.wait(timeout) or self.ready_line is None:
            self.kill()
            raise ProcessError(f"{self.name} not ready after {timeout}s; output:\n" + self.output())
        fields = dict(tok.split("=", 1) for tok in self.ready_line.split()[1:] if "=" in tok)
        return fields

    def output(self) -> str:
        return "\n".join(self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9, by PID, and reap."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close_pipe()

    def _close_pipe(self) -> None:
        # The drain thread sees EOF once the process is gone; then the pipe can close.
        self._reader.join(timeout=5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait(timeout=10)
        self._close_pipe()
        return code

    def wait_for_line(self, needle: str, timeout: float = 10.0, start: int = 0) -> str:
        """Wait until an output line (from index ``start``) contains ``needle``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines)[start:]:
                if needle in line:
                    return line
            if not self.alive():
                break
            time.sleep(0.02)
        raise ProcessError(f"{self.name}: no line containing {needle!r} within {timeout}s:\n" + self.output())


def start_lb(config: Path, *extra: str, env: Mapping[str, str] | None = None) -> ManagedProcess:
    """``python -m lb run -c CONFIG``; returns once it printed READY."""
    p = ManagedProcess([sys.executable, "-m", "lb", "run", "-c", str(config), *extra], env=env, name="quiclb")
    p.wait_ready()
    return p


def start_backend(config: Path, server_id: str, *extra: str, env: Mapping[str, str] | None = None) -> ManagedProcess:
    """``python -m backends -c CONFIG --server-id ID``; returns once it printed READY."""
    p = ManagedProcess(
        [sys.executable, "-m", "backends", "-c", str(config), "--server-id", server_id, *extra],
        env=env, name=f"backend-{server_id}",
    )
    p.wait_ready()
    return p
