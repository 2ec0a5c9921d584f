"""The C tools in bench/c/: building them, and driving the generator, the sinks and the pinger.

Every child is started by us, waited for on its READY line (never a sleep),
stopped by PID, and dies with us (the C tools set PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1]
C_DIR = BENCH / "c"
BUILD = C_DIR / "build"
TOOLS = ("udp_blast", "udp_sink", "udp_forward", "udp_ping")
READY_TIMEOUT_SECONDS = 20.0

# Every live child: an interpreter exit that skipped a ``finally`` (an exception in a thread, sys.exit
# from a signal) still stops the LB and nginx by PID (the C tools also die with us: PR_SET_PDEATHSIG).
_LIVE: weakref.WeakSet[Child] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for child in list(_LIVE):
        if child.proc.poll() is None:
            child.proc.kill()


def build_tools(force: bool = False) -> dict[str, Path]:
    """Compile bench/c/*.c into bench/c/build/ when missing or older than their source."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit(
            "gcc not found: the generator, the sinks and c-forward are C. Install it with:\n"
            "  apt-get update -qq && apt-get install -y -qq gcc libc6-dev"
        )
    BUILD.mkdir(parents=True, exist_ok=True)
    tools = {}
    for name in TOOLS:
        src, out = C_DIR / f"{name}.c", BUILD / name
        newest = max(src.stat().st_mtime, (C_DIR / "udp_common.h").stat().st_mtime)
        if force or not out.exists() or out.stat().st_mtime < newest:
            subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)], check=True)
        tools[name] = out
    return tools


class Child:
    """A process that prints a line starting with READY; output drained by a thread (never blocks on a pipe)."""

    def __init__(self, argv: Sequence[str], name: str, *, stdin: bool = False) -> None:
        self.name = name
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.tail: list[str] = []
        _LIVE.add(self)
        threading.Thread(target=self._drain, name=f"drain-{name}", daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")  # EOF

    def next_line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return ""
        self.tail = [*self.tail[-40:], line]
        return line

    def wait_ready(self) -> dict[str, str]:
        """The READY line's key=value fields; raises (after stopping the child) if it never comes."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            line = self.next_line(deadline - time.monotonic())
            if line.startswith("READY"):
                return dict(tok.split("=", 1) for tok in line.split()[1:] if "=" in tok)
            if line == "" and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"{self.name} did not start; output:\n" + "\n".join(self.tail))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM by PID, SIGKILL after ``timeout``; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        return int(self.proc.returncode)

    def remaining_lines(self) -> list[str]:
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self.lines.get_nowait())
        return out


class Sink:
    """One udp_sink process with several ports; ``snapshot()`` asks for its counts over stdin."""

    def __init__(
        self, exe: Path, host: str, nports: int, cpu: int | None, max_seconds: float, *, mode: str = "count",
        reply_to: str | None = None,
    ) -> None:
        argv = [str(exe), "--host", host, "--ports", ",".join("0" * nports), "--seconds", f"{max_seconds:.0f}"]
        if cpu is not None:
            argv += ["--cpu", str(cpu)]
        if mode == "echo":
            argv.append("--echo")
        elif mode == "reply":
            assert reply_to is not None
            argv += ["--reply-to", reply_to]
        self.mode = mode
        self.child = Child(argv, f"udp_sink-{mode}", stdin=True)
        self.ports = [int(p) for p in self.child.wait_ready()["ports"].split(",")]
        self.final: dict[str, Any] | None = None

    def snapshot(self) -> dict[str, Any]:
        stdin = self.child.proc.stdin
        assert stdin is not None
        stdin.write("s\n")
        stdin.flush()
        line = self.child.next_line(5.0)
        if not line.startswith("{"):
            raise RuntimeError(f"udp_sink stopped answering (exit code {self.child.proc.poll()})")
        return dict(json.loads(line))

    def settle(self, limit: float = 1.5) -> dict[str, Any]:
        """Counts once they stop moving (queues drained), polled every 50 ms up to ``limit`` s."""
        last = self.snapshot()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(0.05)
            cur = self.snapshot()
            if cur["received"] == last["received"]:
                return cur
            last = cur
        return last

    def stop(self) -> None:
        """Close stdin (the sink prints its final count and exits), then stop it by PID."""
        with contextlib.suppress(OSError):
            if self.child.proc.stdin is not None:
                self.child.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.child.proc.wait(timeout=3)
        self.child.stop()
        for line in self.child.remaining_lines():
            if line.startswith("{"):
                self.final = json.loads(line)


def run_json_tool(argv: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a tool that prints one JSON line at its end; raise with its stderr if it fails."""
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"{Path(argv[0]).name} failed ({r.returncode}): {r.stderr.strip()}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))
