"""Load benchmark: LB forwarding capacity C in datagrams/s, beside baselines measured in the same run.

Traffic: routable QUIC short-header datagrams (first octet 0x40 | random low
bits, DCID a single-pass QUIC-LB CID of one of 3 backends in turn, random
nonce, padded to S bytes; 4096 distinct, fixed seed and test key), sent by a
paced C generator (``bench/c/udp_blast.c``: sendmmsg, 8 source ports) through
the target into one C sink process with 3 ports (``bench/c/udp_sink.c``).
Loss = 1 - delivered / sent, counted at the sink once its queues drain.

Capacity C = the highest offered rate with loss <= 0.1% (acceptance D-0),
found per target and size in two phases: short probes (``--probe-seconds``)
climb the ``--rates`` grid (25k..400k/s in factors of sqrt 2) until loss
exceeds 5% or the generator falls short, then full-length steps
(``--step-seconds``) bisect the bracket on a 2^(1/8) grid (about 9%). Only
full-length steps count for C; the highest delivered rate of any step is
reported too. Targets:

* ``c-forward``: ``bench/c/udp_forward.c``, recvmmsg/sendmmsg batches of 64,
  iovec [28-byte PROXY v2 header, payload], round robin over the 3 sink
  ports, no routing: the ceiling for one core.
* ``nginx-pr0`` / ``nginx-default``: nginx's stream module as a plain UDP
  proxy to one sink port, with ``proxy_responses 0`` / default settings.
* ``quiclb``: ``python -m lb run -c FILE`` (default adapter and loop).
* ``quiclb-batched``: the same with ``--io batched`` (skipped when
  ``python -m lb run --help`` lists no ``--io``).

Every target listens with 4 MiB socket buffers, like the LB. With 2 or more
CPUs the target is pinned to CPU 0 and the generator and sink to CPU 1
(``--no-pin``: none). The whole comparison runs ``--repeats`` times, target
order rotated each time so noise hits all alike; each target reports the
median and min..max of C and the ratio of its median C to c-forward's.

Loopback only (127.0.0.0/8); bounded by ``--max-seconds``; every process is
stopped by PID. A default run takes about 6-7 minutes with all five targets::

    .venv/bin/python bench/load_compare.py --save
    .venv/bin/python bench/load_compare.py --targets c-forward quiclb --sizes 1200 \\
        --rates 25000 50000 --step-seconds 1 --repeats 1          # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import platform
import queue
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from lb import CidConfig, __version__, decode_server_id, encode_cid
from quiclb_harness.deployment import BackendSpec, CidConfigSpec, Deployment, ServiceSpec, free_udp_port
from quiclb_harness.processes import ManagedProcess

BENCH = Path(__file__).resolve().parent
C_DIR = BENCH / "c"
BUILD = C_DIR / "build"
TOOLS = ("udp_blast", "udp_sink", "udp_forward")
TARGETS = ("c-forward", "nginx-pr0", "nginx-default", "quiclb", "quiclb-batched")
#: Probe rates: 25k to 400k datagrams/s in factors of sqrt(2).
DEFAULT_RATES = tuple(round(25_000 * 2 ** (k / 2)) for k in range(9))
FINE_FACTOR = 2 ** (1 / 8)  # full-length steps resolve C to about 9%: 2 bisection steps per sqrt(2) bracket
MAX_DOWN_STEPS = 4
DEFAULT_SIZES = (1200, 100)
LOSS_OK = 0.001  # acceptance D-0: C is the highest offered rate with loss <= 0.1%
LOSS_STOP = 0.05  # stop the ramp beyond 5% loss
GENERATOR_SHORTFALL = 0.9  # offered < 90% of the asked rate: the generator is the limit
WARMUP_SECONDS = 0.5
SERVER_IDS = ("0001", "0002", "0003")
TEST_KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")  # a fixed test key, as in micro_codec.py
SEED = 20_261_126
DISTINCT_DATAGRAMS = 4096  # distinct DCIDs the generator cycles through (about 4096 connections)
GEN_SOCKETS = 8
SOCKET_BUFFER = "4m"  # nginx listen rcvbuf/sndbuf, like the LB's 4 MiB
APT_NGINX = "apt-get update -qq && apt-get install -y -qq nginx libnginx-mod-stream"


# -- helpers -------------------------------------------------------------------------------------------


def require_loopback(host: str) -> str:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        sys.exit(f"--host must be an IP literal, got {host!r}")
    if addr.version != 4 or not addr.is_loopback:
        sys.exit(f"refusing {host}: loopback IPv4 only (127.0.0.0/8), acceptance.md §2")
    return host


def build_tools(force: bool) -> dict[str, Path] | None:
    """Compile bench/c/*.c into bench/c/build/ when missing or older than their source."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        print(
            "gcc not found: the generator, the sink and c-forward are C. Install it with:\n"
            "  apt-get update -qq && apt-get install -y -qq gcc libc6-dev"
        )
        return None
    BUILD.mkdir(parents=True, exist_ok=True)
    tools = {}
    for name in TOOLS:
        src, out = C_DIR / f"{name}.c", BUILD / name
        newest = max(src.stat().st_mtime, (C_DIR / "udp_common.h").stat().st_mtime)
        if force or not out.exists() or out.stat().st_mtime < newest:
            subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)], check=True)
        tools[name] = out
    return tools


def command_output(argv: Sequence[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (r.stdout + r.stderr).strip()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def udp_drops() -> dict[int, int]:
    """Kernel receive-queue drops per local UDP port (/proc/net/udp), summed over sockets."""
    drops: dict[int, int] = {}
    with contextlib.suppress(OSError), open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            port = int(cols[1].rsplit(":", 1)[1], 16)
            drops[port] = drops.get(port, 0) + int(cols[12])
    return drops


def bound_udp_ports() -> set[int]:
    return set(udp_drops())


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc/*/stat."""
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


def pin_tree(pid: int, cpu: int | None) -> None:
    """Pin every thread of ``pid`` and of its children to ``cpu`` (sched_setaffinity is per thread)."""
    if cpu is None:
        return
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), {cpu})


def fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x / 1000:.1f}k"


# -- datagrams -----------------------------------------------------------------------------------------


def build_datagrams(cfg: CidConfig, size: int, count: int, seed: int) -> list[bytes]:
    """Routable short headers: 0x40 | random low bits, a CID of each backend in turn, padding to ``size``."""
    rng = random.Random(seed)
    sids = [bytes.fromhex(s) for s in SERVER_IDS]
    out = []
    for i in range(count):
        cid = encode_cid(cfg, sids[i % len(sids)], rng.randbytes(cfg.nonce_len))
        head = bytes((0x40 | rng.randrange(64),)) + cid
        if size < len(head):
            raise ValueError(f"size {size} is below the short header's {len(head)} bytes")
        out.append(head + rng.randbytes(size - len(head)))
    for i, d in enumerate(out[: 3 * len(sids)]):  # self-check: they decode to the backend they were made for
        assert decode_server_id(cfg, d[1 : 1 + cfg.cid_len]) == sids[i % len(sids)]
    return out


def write_datagrams(path: Path, datagrams: Sequence[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack("!H", len(d)) + d for d in datagrams))


# -- processes -----------------------------------------------------------------------------------------


class Sink:
    """One udp_sink process with several ports; ``snapshot()`` asks it for its counts over stdin."""

    def __init__(self, exe: Path, host: str, nports: int, cpu: int | None, max_seconds: float) -> None:
        argv = [str(exe), "--host", host, "--ports", ",".join("0" * nports), "--seconds", f"{max_seconds:.0f}"]
        if cpu is not None:
            argv += ["--cpu", str(cpu)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.final: dict[str, Any] | None = None
        threading.Thread(target=self._drain, name="drain-sink", daemon=True).start()
        ready = self._next_line(10.0)
        if not ready.startswith("READY ports="):
            self.stop()
            raise RuntimeError(f"udp_sink did not start: {ready!r}")
        self.ports = [int(p) for p in ready.split("=", 1)[1].split(",")]

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("")  # EOF

    def _next_line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return ""

    def snapshot(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("s\n")
        self.proc.stdin.flush()
        line = self._next_line(5.0)
        if not line.startswith("{"):
            raise RuntimeError(f"udp_sink stopped answering (exit code {self.proc.poll()})")
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
        """Close stdin (the sink prints its final count and exits); SIGKILL by PID after 5 s."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        with contextlib.suppress(queue.Empty, ValueError):
            while True:
                line = self.lines.get_nowait()
                if line.startswith("{"):
                    self.final = json.loads(line)


@dataclass
class Target:
    """A process under test: ``start()`` returns once it listens on ``port``; ``stop()`` by PID."""

    name: str
    adapter: str
    port: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


@dataclass
class ManagedTarget(Target):
    """A target that prints READY (udp_forward, quiclb), run through lb.testing.processes."""

    argv: list[str] = field(default_factory=list)
    fixed_port: int = 0  # known before start (quiclb's VIP); else read from READY port=N
    cpu: int | None = None
    proc: ManagedProcess | None = None

    def start(self) -> None:
        self.proc = ManagedProcess(self.argv, name=self.name)
        fields = self.proc.wait_ready()
        self.port = self.fixed_port or int(fields["port"])
        pin_tree(self.proc.pid, self.cpu)

    def stop(self) -> None:
        if self.proc is None:
            return
        code = self.proc.stop(timeout=5)
        tail = [ln for ln in self.proc.lines if ln.startswith("{")]
        self.info = {"exit_code": code, **(json.loads(tail[-1]) if tail else {})}
        if code not in (0, -signal.SIGTERM):
            self.info["output_tail"] = list(self.proc.lines)[-20:]
        self.proc = None


@dataclass
class NginxTarget(Target):
    """nginx -g 'daemon off;' with a stream UDP proxy to one sink port; master and worker stopped by PID."""

    exe: str = "nginx"
    stream_module: Path | None = None
    responses_zero: bool = False
    sink: tuple[str, int] = ("127.0.0.1", 0)
    workdir: Path = Path()
    cpu: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    tree: list[tuple[int, str | None]] = field(default_factory=list)

    def start(self) -> None:
        host = self.sink[0]
        self.port = free_udp_port(host)
        d = self.workdir / self.name
        d.mkdir(parents=True, exist_ok=True)
        load = f"load_module {self.stream_module};\n" if self.stream_module else ""
        user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
        responses = "        proxy_responses 0;\n" if self.responses_zero else ""
        (d / "nginx.conf").write_text(
            f"{load}{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
            "events { worker_connections 4096; }\n"
            "stream {\n    server {\n"
            f"        listen {host}:{self.port} udp rcvbuf={SOCKET_BUFFER} sndbuf={SOCKET_BUFFER};\n"
            f"        proxy_pass {host}:{self.sink[1]};\n{responses}"
            "    }\n}\n"
        )
        log = (d / "stdout.log").open("wb")
        self.proc = subprocess.Popen(
            [self.exe, "-p", f"{d}/", "-c", str(d / "nginx.conf"), "-e", str(d / "error.log"), "-g", "daemon off;"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while self.port not in bound_udp_ports() or len(process_tree(self.proc.pid)) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                err = (d / "error.log").read_text() if (d / "error.log").exists() else ""
                raise RuntimeError(f"nginx did not start:\n{(d / 'stdout.log').read_text()}\n{err}")
            time.sleep(0.05)
        self.tree = [(p, start_time(p)) for p in process_tree(self.proc.pid)]
        pin_tree(self.proc.pid, self.cpu)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to the master: fast shutdown of the worker too
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for pid, started in self.tree[1:]:  # a worker outliving a killed master: by PID, if still the same
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.info = {"exit_code": self.proc.returncode}
        self.proc = None


def nginx_setup(exe: str | None) -> tuple[str | None, Path | None, str]:
    """(binary, stream module to load or None, version text); binary None (with a reason) when unusable."""
    if exe is None or not (shutil.which(exe) or Path(exe).exists()):
        return None, None, f"nginx not installed; install it with: {APT_NGINX}"
    info = command_output([exe, "-V"])
    version = info.splitlines()[0] if info else "?"
    if "--with-stream=dynamic" in info:
        dirs = [Path(exe).resolve().parents[1] / "lib/nginx/modules"]
        dirs += [Path(a.split("=", 1)[1]) for a in info.split() if a.startswith("--modules-path=")]
        for m in (dd / "ngx_stream_module.so" for dd in dirs):
            if m.exists():
                return exe, m, version
        return None, None, f"{version}: the stream module is missing; install it with: {APT_NGINX}"
    if "--with-stream" not in info:
        return None, None, f"{version}: built without the stream module"
    return exe, None, version


def lb_has_io_option() -> bool:
    return "--io" in command_output([sys.executable, "-m", "lb", "run", "--help"])


# -- measurement ---------------------------------------------------------------------------------------


@dataclass
class Bench:
    tools: dict[str, Path]
    host: str
    sink: Sink
    files: dict[int, Path]
    load_cpu: int | None
    probe_seconds: float
    step_seconds: float
    deadline: float

    def step(self, target: Target, size: int, rate: int, seconds: float) -> dict[str, Any]:
        watch = [target.port, *self.sink.ports]
        drops0, snap0 = udp_drops(), self.sink.snapshot()
        argv = [
            str(self.tools["udp_blast"]),
            "--target",
            f"{self.host}:{target.port}",
            "--file",
            str(self.files[size]),
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--sockets",
            str(GEN_SOCKETS),
        ]
        if self.load_cpu is not None:
            argv += ["--cpu", str(self.load_cpu)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 15, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"udp_blast failed ({r.returncode}): {r.stderr.strip()}")
        gen = json.loads(r.stdout.strip().splitlines()[-1])
        snap1 = self.sink.settle()
        drops1 = udp_drops()
        sent, delivered = int(gen["sent"]), int(snap1["received"] - snap0["received"])
        per_port = {p: snap1["per_port"][p] - snap0["per_port"][p] for p in snap1["per_port"]}
        d = {p: drops1.get(p, 0) - drops0.get(p, 0) for p in watch}
        return {
            "rate": rate,
            "sent": sent,
            "delivered": delivered,
            "seconds": round(gen["seconds"], 4),
            "offered": round(sent / gen["seconds"]),
            "delivered_rate": round(delivered / gen["seconds"]),
            "loss": round(max(0.0, 1 - delivered / sent), 6) if sent else 1.0,
            "target_rx_drops": d[target.port],
            "sink_rx_drops": sum(d[p] for p in self.sink.ports),
            "send_errors": gen["errors"],
            "per_port": per_port,
        }

    def measure(self, run: dict[str, Any], kind: str, target: Target, size: int, rate: int) -> dict[str, Any]:
        seconds = self.probe_seconds if kind == "probe" else self.step_seconds
        if time.monotonic() + seconds > self.deadline:
            run["truncated"] = True
            raise TimeoutError
        s = {"kind": kind, **self.step(target, size, rate, seconds)}
        run["probes" if kind == "probe" else "steps"].append(s)
        print(
            f"    {target.name:15s} {size:5d} B  {kind:5s} offered {fmt_rate(s['offered']):>7s}/s  delivered "
            f"{fmt_rate(s['delivered_rate']):>7s}/s  loss {s['loss']:7.2%}  target drops "
            f"{s['target_rx_drops']}  sink drops {s['sink_rx_drops']}",
            flush=True,
        )
        return s

    def ramp(self, target: Target, size: int, rates: Sequence[int]) -> dict[str, Any]:
        """Start the target, find C and the max delivered rate, stop the target.

        1. Probes (``probe_seconds`` each) climb the coarse ``rates`` until loss exceeds 5% or the
           generator falls short: the last probe with loss <= 0.1% and the first above bracket C.
        2. Full-length steps (``step_seconds``) bisect that bracket on a grid of FINE_FACTOR: two
           steps for a factor-sqrt(2) bracket. When the bracket's lower end fails at full length
           too, steps go down the grid until one passes (at most MAX_DOWN_STEPS).
        C is the highest offered rate with loss <= 0.1% among full-length steps only.
        """
        run: dict[str, Any] = {
            "target": target.name,
            "adapter": target.adapter,
            "size": size,
            "probes": [],
            "steps": [],
        }
        target.start()
        try:
            run["warmup"] = self.step(target, size, rates[0], WARMUP_SECONDS)
            lo: int | None = None
            hi: int | None = None
            for rate in rates:
                s = self.measure(run, "probe", target, size, rate)
                if s["loss"] <= LOSS_OK:
                    lo = rate
                elif hi is None:
                    hi = rate
                if s["loss"] > LOSS_STOP:
                    break
                if s["offered"] < GENERATOR_SHORTFALL * rate:
                    run["generator_bound"] = True
                    break
            if hi is not None and lo is not None and hi < lo:
                hi = None  # a noisy probe failed below a passing one: bisect nothing, confirm lo
            self.bisect(run, target, size, lo, hi, rates[0])
        except TimeoutError:
            pass
        finally:
            target.stop()
        steps = run["steps"]
        passing = [s for s in steps if s["loss"] <= LOSS_OK]
        best = max(passing, key=lambda s: s["offered"], default=None)
        run["capacity"] = best["offered"] if best else 0
        run["max_delivered"] = max((s["delivered_rate"] for s in steps + run["probes"]), default=0)
        # C is only a lower bound when nothing above it failed, probe or step: the generator or the grid ran out.
        run["capacity_lower_bound"] = best is not None and not any(
            s["loss"] > LOSS_OK and s["rate"] > best["rate"] for s in steps + run["probes"]
        )
        run["generator_bound"] = run.get("generator_bound", False) or any(
            s["offered"] < GENERATOR_SHORTFALL * s["rate"] for s in steps
        )
        run["sink_dropped"] = any(s["sink_rx_drops"] for s in steps + run["probes"])
        run["target_info"] = target.info
        return run

    def bisect(
        self, run: dict[str, Any], target: Target, size: int, lo: int | None, hi: int | None, floor: int
    ) -> None:
        """Full-length steps between the probes' bracket (lo passed, hi failed; either may be None)."""

        def ok(rate: float) -> bool:
            return bool(self.measure(run, "step", target, size, round(rate))["loss"] <= LOSS_OK)

        if lo is None:  # even the first probe failed: walk down from it
            rate: float = (hi or floor) / FINE_FACTOR
            for _ in range(MAX_DOWN_STEPS):
                if ok(rate):
                    return
                rate /= FINE_FACTOR
            return
        if hi is not None:
            left, right = 0, max(1, round(math.log(hi / lo) / math.log(FINE_FACTOR)))
            while right - left > 1:  # invariant: lo * F**left passed (a probe), lo * F**right failed
                mid = (left + right) // 2
                if ok(lo * FINE_FACTOR**mid):
                    left = mid
                else:
                    right = mid
            if left > 0:
                return
        rate = lo  # the bracket's lower end has only a short probe behind it: confirm, else walk down
        for _ in range(MAX_DOWN_STEPS + 1):
            if ok(rate):
                return
            rate /= FINE_FACTOR


def summarize(runs: list[dict[str, Any]], targets: Sequence[str], sizes: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        ref = [r for r in runs if r["size"] == size and r["target"] == "c-forward"]
        ref_c = statistics.median(r["capacity"] for r in ref) if ref else None
        ref_d = statistics.median(r["max_delivered"] for r in ref) if ref else None
        for name in targets:
            mine = [r for r in runs if r["size"] == size and r["target"] == name]
            if not mine:
                continue
            cs = [r["capacity"] for r in mine]
            md = [r["max_delivered"] for r in mine]
            med, med_d = statistics.median(cs), statistics.median(md)
            rows.append(
                {
                    "size": size,
                    "target": name,
                    "adapter": mine[0]["adapter"],
                    "repeats": len(mine),
                    "capacity_median": med,
                    "capacity_min": min(cs),
                    "capacity_max": max(cs),
                    "max_delivered_median": med_d,
                    "max_delivered_min": min(md),
                    "max_delivered_max": max(md),
                    "ratio_to_c_forward": round(med / ref_c, 3) if ref_c else None,
                    "max_delivered_ratio_to_c_forward": round(med_d / ref_d, 3) if ref_d else None,
                    "generator_bound": any(r["generator_bound"] for r in mine),
                    "lower_bound": any(r["capacity_lower_bound"] for r in mine),
                    "sink_dropped": any(r["sink_dropped"] for r in mine),
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'size':>6s}  {'target':15s} {'C median':>9s}  {'[min..max]':19s} {'ratio':>6s}  "
        f"{'max delivered':>13s} {'ratio':>6s}  notes"
    )
    for r in rows:
        notes = []
        if r["lower_bound"]:
            notes.append(">= (no full step above C failed)")
        if r["generator_bound"]:
            notes.append("generator-bound")
        if r["capacity_min"] == 0:
            notes.append("a repeat had no full step passing: C below the lowest rate tried")
        if r["sink_dropped"]:
            notes.append("SINK DROPPED: figures suspect")
        ratio, dratio = (
            ("n/a" if x is None else f"{x:.2f}x")
            for x in (r["ratio_to_c_forward"], r["max_delivered_ratio_to_c_forward"])
        )
        spread = f"[{fmt_rate(r['capacity_min'])}..{fmt_rate(r['capacity_max'])}]"
        print(
            f"{r['size']:5d}B  {r['target']:15s} {fmt_rate(r['capacity_median']):>9s}  {spread:19s} "
            f"{ratio:>6s}  {fmt_rate(r['max_delivered_median']):>13s} {dratio:>6s}  {'; '.join(notes)}"
        )


# -- main ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` stops its processes by PID."""

    def handler(_signum: int, _frame: object) -> None:
        raise SystemExit(143)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def choose_cpus(no_pin: bool) -> tuple[int | None, int | None]:
    allowed = os.sched_getaffinity(0)
    if no_pin or not {0, 1} <= allowed:
        return None, None
    return 0, 1


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    ap.add_argument("--sizes", nargs="+", type=int, default=list(DEFAULT_SIZES), help="datagram sizes, bytes")
    ap.add_argument("--rates", nargs="+", type=int, default=list(DEFAULT_RATES), help="offered rates, datagrams/s")
    ap.add_argument("--step-seconds", type=float, default=3.0, help="length of a full step (C counts only these)")
    ap.add_argument("--probe-seconds", type=float, default=0.5, help="length of a bracketing probe")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=600.0, help="wall-clock limit for the whole run")
    ap.add_argument("--host", default="127.0.0.1", help="loopback IPv4 address for every socket")
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx", help="nginx binary")
    ap.add_argument("--no-pin", action="store_true", help="do not pin target / load to CPUs 0 / 1")
    ap.add_argument("--rebuild", action="store_true", help="recompile the C tools")
    ap.add_argument("--save", action="store_true", help="write bench/results/load_compare-<time>.json")
    args = ap.parse_args()
    host = require_loopback(args.host)
    if not 1 <= args.repeats <= 20 or not 10 <= args.max_seconds <= 3000:
        ap.error("--repeats 1..20, --max-seconds 10..3000")
    if not all(0.2 <= x <= 60 for x in (args.step_seconds, args.probe_seconds)):
        ap.error("--step-seconds and --probe-seconds must be 0.2..60")
    if any(not 0 < r <= 2_000_000 for r in args.rates) or any(not 40 <= s <= 1472 for s in args.sizes):
        ap.error("rates 1..2,000,000 datagrams/s; sizes 40..1472 bytes")
    rates = sorted(set(args.rates))
    tools = build_tools(args.rebuild)
    if tools is None:
        return 2
    target_cpu, load_cpu = choose_cpus(args.no_pin)
    notes: list[str] = []
    targets = list(dict.fromkeys(args.targets))
    nginx_exe, stream_module, nginx_version = nginx_setup(args.nginx)
    if nginx_exe is None and any(t.startswith("nginx") for t in targets):
        notes.append(f"nginx targets skipped: {nginx_version}")
        targets = [t for t in targets if not t.startswith("nginx")]
    if "quiclb-batched" in targets and not lb_has_io_option():
        notes.append("quiclb-batched skipped: `python -m lb run --help` lists no --io option")
        targets.remove("quiclb-batched")
    for n in notes:
        print(f"note: {n}")
    if not targets:
        print("no target left to measure")
        return 2

    start = time.monotonic()
    deadline = start + args.max_seconds
    # Typically: start + warm-up ~2 s, ~5 probes, 2-3 full steps, ~0.3 s of settling each.
    typical = (
        args.repeats
        * len(args.sizes)
        * len(targets)
        * (2 + 5 * (args.probe_seconds + 0.3) + 2.5 * (args.step_seconds + 0.3))
    )
    print(
        f"targets {', '.join(targets)}; sizes {args.sizes}; probe rates {rates}; {args.probe_seconds:g} s probes, "
        f"{args.step_seconds:g} s steps; "
        f"{args.repeats} repeats; pinning: "
        + (f"target CPU {target_cpu}, generator+sink CPU {load_cpu}" if target_cpu is not None else "off")
        + f"; typically ~{typical:.0f} s, at most {args.max_seconds:.0f} s",
        flush=True,
    )

    runs: list[dict[str, Any]] = []
    cfg = CidConfig(0, 2, 14, TEST_KEY)
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="quiclb-load-") as tmp:
        work = Path(tmp)
        files = {}
        for size in args.sizes:
            files[size] = work / f"datagrams-{size}.bin"
            write_datagrams(files[size], build_datagrams(cfg, size, DISTINCT_DATAGRAMS, SEED + size))
        sink = Sink(tools["udp_sink"], host, len(SERVER_IDS), load_cpu, args.max_seconds + 120)
        try:
            dep = Deployment(
                work / "quiclb",
                [
                    ServiceSpec(
                        vip_host=host,
                        cid_configs=[CidConfigSpec(key=TEST_KEY)],
                        backends=[
                            BackendSpec(sid, port=p, host=host) for sid, p in zip(SERVER_IDS, sink.ports, strict=True)
                        ],
                    )
                ],
                inside_host=host,
                admin=False,
                health_interval=3600.0,
                health_timeout=1.0,
            )
            dep.write()  # health probes hourly: the sinks never answer, and probes would count as traffic
            lb_argv = [sys.executable, "-m", "lb", "run", "-c", str(dep.path)]
            sinks = ",".join(f"{host}:{p}" for p in sink.ports)
            fwd_argv = [
                str(tools["udp_forward"]),
                "--listen",
                f"{host}:0",
                "--to",
                sinks,
                "--prefix",
                "28",
                "--seconds",
                f"{args.max_seconds + 120:.0f}",
            ]
            if target_cpu is not None:
                fwd_argv += ["--cpu", str(target_cpu)]
            vip_port = dep.vip()[1]

            def make(name: str) -> Target:
                if name == "c-forward":
                    return ManagedTarget(
                        name, "C recvmmsg/sendmmsg, batch 64, 28 B prefix", argv=fwd_argv, cpu=target_cpu
                    )
                if name == "quiclb":
                    return ManagedTarget(name, "default", argv=lb_argv, fixed_port=vip_port, cpu=target_cpu)
                if name == "quiclb-batched":
                    return ManagedTarget(
                        name, "--io batched", argv=[*lb_argv, "--io", "batched"], fixed_port=vip_port, cpu=target_cpu
                    )
                assert nginx_exe is not None
                zero = name == "nginx-pr0"
                return NginxTarget(
                    name,
                    "proxy_responses 0" if zero else "default settings",
                    exe=nginx_exe,
                    stream_module=stream_module,
                    responses_zero=zero,
                    sink=(host, sink.ports[0]),
                    workdir=work / "nginx",
                    cpu=target_cpu,
                )

            bench = Bench(tools, host, sink, files, load_cpu, args.probe_seconds, args.step_seconds, deadline)
            for rep in range(args.repeats):
                order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
                for size in args.sizes:
                    print(f"repeat {rep + 1}/{args.repeats}, {size} B: {', '.join(order)}", flush=True)
                    for name in order:
                        if time.monotonic() > deadline:
                            notes.append(f"stopped at --max-seconds {args.max_seconds:g}: results are partial")
                            break
                        try:
                            run = bench.ramp(make(name), size, rates)
                        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
                            print(f"    {name}: FAILED: {e}", flush=True)
                            notes.append(f"{name} {size} B repeat {rep + 1} failed: {str(e).splitlines()[0]}")
                            continue
                        run["repeat"] = rep
                        runs.append(run)
        finally:
            sink.stop()

    rows = summarize(runs, targets, args.sizes)
    print_table(rows)
    for n in dict.fromkeys(notes):
        print(f"note: {n}")
    elapsed = time.monotonic() - start
    print(f"elapsed {elapsed:.0f} s")
    commit = command_output(["git", "-C", str(BENCH), "rev-parse", "--short", "HEAD"])
    dirty = bool(command_output(["git", "-C", str(BENCH), "status", "--porcelain", "--untracked-files=no"]))
    doc = {
        "bench": "load_compare",
        "kind": "load",
        "commit": commit,
        "dirty": dirty,
        "python": sys.version.split()[0],
        "quiclb": __version__,
        "loop": "uvloop" if package_version("uvloop") else "asyncio",
        "uvloop": package_version("uvloop"),
        "adapters": {r["target"]: r["adapter"] for r in rows},
        "cpus": os.cpu_count(),
        "uname": " ".join(platform.uname()),
        "versions": {
            "nginx": nginx_version if nginx_exe else None,
            "gcc": command_output(["gcc", "--version"]).splitlines()[0],
        },
        "sysctl": {k: command_output(["sysctl", "-n", f"net.core.{k}"]) for k in ("rmem_max", "wmem_max")},
        "pinning": {"target_cpu": target_cpu, "generator_and_sink_cpu": load_cpu},
        "sizes": args.sizes,
        "rates": rates,
        "step_seconds": args.step_seconds,
        "probe_seconds": args.probe_seconds,
        "fine_factor": FINE_FACTOR,
        "repeats": args.repeats,
        "loss_ok": LOSS_OK,
        "loss_stop": LOSS_STOP,
        "distinct_datagrams": DISTINCT_DATAGRAMS,
        "generator_sockets": GEN_SOCKETS,
        "elapsed_seconds": round(elapsed, 1),
        "unit": "datagrams/s; capacity = highest offered rate with loss <= loss_ok",
        "notes": list(dict.fromkeys(notes)),
        "summary": rows,
        "runs": runs,
        "sink_final": sink.final,
    }
    if args.save:
        out = BENCH / "results"
        out.mkdir(exist_ok=True)
        path = out / f"load_compare-{time.strftime('%Y%m%dT%H%M%S')}.json"
        path.write_text(json.dumps(doc, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
