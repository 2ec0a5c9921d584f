"""One measured step, the capacity search, and CPU time per datagram in interleaved rounds.

A step: sample the target tree's CPU time, run the generator for ``seconds``
at ``rate`` (0 = unpaced), wait until the sink's counts stop moving, sample
again. Delivered = datagrams counted at the sink (forward path) or back at
the client (return path). Loss = 1 - delivered / expected, where expected
excludes datagrams the target must drop (the mix's garbage, for quiclb).

A step passes when loss <= 0.1% (acceptance D-0) and the target kept up
during the step: at most 1% of the datagrams were still queued when the
generator stopped. Without that second rule a 4 MiB socket buffer hides a
~5% overload for a 1 s step.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procstat import cpu_busy_ns, cpu_sample, kernel_drops, udp_drops
from .targets import Target
from .tools import Sink, run_json_tool

LOSS_OK = 0.001
LAG_OK = 0.01
GENERATOR_SHORTFALL = 0.97  # offered < 97% of the asked rate: the generator, not the target, was the limit
GEN_SOCKETS = 8


@dataclass
class Load:
    """What the generator sends: udp_blast arguments, how many distinct datagrams, whether replies come back."""

    name: str
    blast_args: list[str]
    distinct: int
    replies: bool = False
    #: Datagrams among [start, start + sent) that ``target`` must drop by design (default none).
    must_drop: Callable[[Target, int, int], int] = field(default=lambda _t, _s, _n: 0)
    cursor: int = 0  # the next step starts where the last one stopped: a 1M table is walked, not replayed


@dataclass
class Bench:
    """Everything a step needs besides the target and the load."""

    blast: Path
    host: str
    load_cpu: int | None
    deadline: float
    log: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr, flush=True))

    def step(self, target: Target, load: Load, sink: Sink | None, rate: float, seconds: float) -> dict[str, Any]:
        if time.monotonic() + seconds > self.deadline:
            raise TimeoutError("the run's --max-seconds is spent")
        argv = [str(self.blast), "--target", f"{self.host}:{target.port}", *load.blast_args, "--rate",
                str(round(rate)), "--seconds", f"{seconds:g}", "--sockets", str(GEN_SOCKETS), "--start",
                str(load.cursor)]
        if load.replies:
            argv.append("--replies")
        if self.load_cpu is not None:
            argv += ["--cpu", str(self.load_cpu)]
        drops0, kdrops0 = udp_drops(), kernel_drops()
        snap0 = sink.snapshot() if sink is not None else None
        cpu0, busy0 = cpu_sample(target.pid), cpu_busy_ns(target.cpu)
        gen = run_json_tool(argv, timeout=seconds + 20)
        t_end = time.monotonic()
        snap_end = sink.snapshot() if sink is not None else None
        snap1 = sink.settle() if sink is not None else None
        cpu1, busy1 = cpu_sample(target.pid), cpu_busy_ns(target.cpu)
        # Busy share of one CPU while loaded: the generator's time plus the drain after it (the last
        # 50 ms poll of settle() saw nothing move, so it is not counted). Below 1 on a shared CPU too.
        wall = gen["seconds"] + max(0.0, time.monotonic() - t_end - 0.05)
        drops1, kdrops1 = udp_drops(), kernel_drops()
        start = load.cursor
        load.cursor = (load.cursor + int(gen["sent"])) % max(1, load.distinct)
        sent = int(gen["sent"])
        expected = sent - load.must_drop(target, start, sent)
        if snap0 is not None and snap1 is not None and snap_end is not None:
            delivered = int(snap1["received"] - snap0["received"])
            lag = (snap1["received"] - snap_end["received"]) / expected if expected else 0.0
        else:
            delivered, lag = int(gen["received"]), 0.0
        cpu_ns = cpu1.ns - cpu0.ns
        loss = max(0.0, 1 - delivered / expected) if expected else 1.0
        s = {
            "rate": round(rate),
            "sent": sent,
            "expected": expected,
            "delivered": delivered,
            "seconds": round(gen["seconds"], 4),
            "offered": round(sent / gen["seconds"]),
            "delivered_rate": round(delivered / gen["seconds"]),
            "loss": round(loss, 6),
            "lag": round(lag, 5),
            "passed": loss <= LOSS_OK and lag <= LAG_OK,
            "cpu_ns": cpu_ns,
            "cpu_ticks": cpu1.ticks - cpu0.ticks,
            "cpu_us_per_datagram": round(cpu_ns / 1000 / delivered, 4) if delivered else None,
            # Datagrams per time the target was scheduled in: about its batch size per wakeup.
            "datagrams_per_wakeup": round(delivered / (cpu1.slices - cpu0.slices), 2)
            if delivered and cpu1.slices > cpu0.slices else None,
            "target_cpu_util": round(cpu_ns / 1e9 / wall, 3),
            # What else ran on the target's CPU (other tenants, interrupts): 0 when the target is unpinned.
            "others_on_target_cpu_util": round(max(0, busy1 - busy0 - cpu_ns) / 1e9 / wall, 3)
            if target.cpu is not None else None,
            "target_rx_drops": drops1.get(target.port, 0) - drops0.get(target.port, 0),
            "sink_rx_drops": sum(drops1.get(p, 0) - drops0.get(p, 0) for p in (sink.ports if sink else [])),
            "all_udp_rx_drops": sum(drops1.values()) - sum(drops0.values()),
            **{k: kdrops1[k] - kdrops0[k] for k in kdrops1},
            "send_errors": gen["errors"],
            "generator_short": rate > 0 and sent / gen["seconds"] < GENERATOR_SHORTFALL * rate,
        }
        asked = "unpaced" if rate == 0 else f"{rate / 1000:.1f}k/s"
        self.log(
            f"    {target.name:18s} {load.name:12s} asked {asked:>9s} offered {s['offered'] / 1000:7.1f}k/s "
            f"delivered {s['delivered_rate'] / 1000:7.1f}k/s loss {loss:7.3%} lag {lag:6.2%} "
            f"cpu {s['cpu_us_per_datagram'] or 0:6.2f} us/dgram util {s['target_cpu_util']:.2f} "
            f"per wakeup {s['datagrams_per_wakeup'] or 0:6.1f} "
            f"others {s['others_on_target_cpu_util'] or 0:.2f} drops target {s['target_rx_drops']} "
            f"all {s['all_udp_rx_drops']} backlog {s['softnet_dropped']}"
            + ("  PASS" if s["passed"] else "  fail")
        )
        return s


def find_capacity(
    bench: Bench, target: Target, load: Load, sink: Sink | None, *, probe_seconds: float, step_seconds: float,
    max_steps: int = 9, resolution: float = 1.05,
) -> dict[str, Any]:
    """Highest offered rate with a passing step, to ``resolution`` (5%): gallop from the unpaced figure, bisect.

    The unpaced probe gives the generator's ceiling and the target's delivered rate under overload. If
    the target passes even unpaced, its capacity is at least the generator's: generator-bound.
    """
    probe = bench.step(target, load, sink, 0, probe_seconds)
    gen_max = probe["offered"]
    steps: list[dict[str, Any]] = []
    result: dict[str, Any] = {"unpaced": probe, "steps": steps, "generator_max": gen_max}
    if probe["passed"]:
        result.update(capacity=gen_max, generator_bound=True, bound="generator")
        return result
    lo: float | None = None
    hi: float | None = None
    rate = max(2000.0, min(probe["delivered_rate"], gen_max) * 0.95)
    for _ in range(max_steps):
        s = bench.step(target, load, sink, rate, step_seconds)
        steps.append(s)
        if s["passed"]:
            lo = max(lo or 0, s["offered"])
        else:
            hi = rate if hi is None else min(hi, rate)
        if lo is not None and hi is not None:
            if hi / lo <= resolution:
                break
            rate = (lo * hi) ** 0.5
        elif lo is not None:
            if rate >= gen_max * 0.95 or s["generator_short"]:
                break  # the generator cannot offer more
            rate = min(rate * 1.3, gen_max * 0.97)
        else:
            rate /= 1.3
    capacity = lo or 0
    # Generator-bound unless a paced step above the capacity failed with the generator on schedule: only
    # that shows the target's limit (the unpaced probe's loss may be the sending CPU's backlog overflowing).
    clean_fail = any(not s["passed"] and not s["generator_short"] and s["offered"] > capacity for s in steps)
    result.update(capacity=capacity, generator_bound=not clean_fail)
    return result


def cpu_rounds(
    bench: Bench, pairs: Sequence[tuple[Target, Sink | None]], load: Load, rate: float, seconds: float, rounds: int
) -> dict[str, dict[str, Any]]:
    """CPU time per delivered datagram at one fixed rate, targets interleaved (A, B, C, A, B, C, ...).

    Interleaving spreads the shared machine's drift over every target alike; each target's figure
    is the median of its rounds, with min..max beside it.
    """
    per: dict[str, list[dict[str, Any]]] = {t.name: [] for t, _ in pairs}
    for r in range(rounds):
        order = list(pairs[r % len(pairs):]) + list(pairs[: r % len(pairs)])
        for target, sink in order:
            per[target.name].append(bench.step(target, load, sink, rate, seconds))
    out = {}
    for name, steps in per.items():
        vals = [s["cpu_us_per_datagram"] for s in steps if s["cpu_us_per_datagram"] is not None]
        out[name] = {
            "rate": round(rate),
            "cpu_us_median": round(statistics.median(vals), 3) if vals else None,
            "cpu_us_min": min(vals, default=None),
            "cpu_us_max": max(vals, default=None),
            # Loss only: a lag (backlog at the step's end) at this rate means the target was starved of
            # CPU for a while (the machine is shared); it is reported, and makes batches larger.
            "all_passed": all(s["loss"] <= LOSS_OK for s in steps),
            "max_loss": max(s["loss"] for s in steps),
            "max_lag": max(s["lag"] for s in steps),
            "others_on_target_cpu_median": statistics.median(
                s["others_on_target_cpu_util"] or 0.0 for s in steps),
            "steps": steps,
        }
    return out


def run_ping(exe: Path, host: str, port: int, file: Path, rate: int, count: int, cpu: int | None) -> dict[str, Any]:
    argv = [str(exe), "--target", f"{host}:{port}", "--file", str(file), "--rate", str(rate), "--count", str(count)]
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    try:
        return run_json_tool(argv, timeout=count / rate + 30)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError("udp_ping timed out") from e
