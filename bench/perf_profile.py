"""Where quiclb's CPU goes under load, by `perf`: kernel, interpreter, event loop, cffi, beside the C forwarder.

The load bench says how much CPU a datagram costs; this says whose code it is.
For the 100 B forward path (4096 cached DCIDs) and the cold cache (1M DCIDs),
at a moderate rate (batches of about 10) and a high one (batches of hundreds),
targets interleaved round by round, each step samples the target with
``perf record -p PID`` (the VM's cpu-clock event) while the load bench's
generator runs, and splits the samples by the object they fell in: the
kernel, ``libpython`` (the interpreter), uvloop, cffi, libc and the rest.
Kernel time per datagram is then that share of the step's schedstat CPU.

Needs ``perf`` (Debian: ``linux-perf``) and root; bounded by --seconds per step.

    .venv/bin/python bench/perf_profile.py [--rates 50000 250000] [--seconds 3] [--rounds 2] [--save]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loadbench.measure import Bench, Load
from loadbench.procstat import choose_cpus
from loadbench.scenarios import CACHED_DISTINCT, SEED, SINGLE_PASS, Env, Scenario, make_target
from loadbench.targets import Target, free_udp_port
from loadbench.tools import Sink, build_tools
from loadbench.traffic import heads_file
from results_file import run_metadata, write_result

HOST = "127.0.0.1"
COLD_DISTINCT = 1_000_000
#: perf's object names -> the groups reported.
GROUPS = (("kernel", re.compile(r"\[kernel")), ("interpreter", re.compile(r"libpython")),
          ("uvloop", re.compile(r"^loop\.cpython")), ("cffi", re.compile(r"_cffi_backend")),
          ("libc", re.compile(r"^libc\.so")))


def dso_shares(data: Path) -> dict[str, float]:
    """Share of samples per group, from ``perf report --sort dso``."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--sort", "dso", "--stdio", "-q"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    shares = dict.fromkeys([name for name, _ in GROUPS] + ["other"], 0.0)
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[0].endswith("%"):
            continue
        pct, dso = float(parts[0].rstrip("%")) / 100, " ".join(parts[1:])
        group = next((name for name, rx in GROUPS if rx.search(dso)), "other")
        shares[group] += pct
    return {k: round(v, 4) for k, v in shares.items()}


def profiled_step(bench: Bench, target: Target, load: Load, sink: Sink, rate: int, seconds: float,
                  work: Path) -> dict[str, Any]:
    """One load step with perf sampling the target for its middle part."""
    data = work / f"{target.name}-{rate}.perf"
    window = max(1.0, seconds - 1.0)

    def record() -> None:
        time.sleep(0.5)  # let the step reach its rate
        subprocess.run(["perf", "record", "-q", "-o", str(data), "-p", str(target.pid), "--", "sleep",
                        f"{window:g}"], capture_output=True, check=False, timeout=window + 30)

    sampler = threading.Thread(target=record)
    sampler.start()
    step = bench.step(target, load, sink, rate, seconds)
    sampler.join()
    shares = dso_shares(data)
    data.unlink(missing_ok=True)
    cpu = step["cpu_us_per_datagram"] or 0.0
    return {"rate": rate, "cpu_us_per_datagram": cpu, "datagrams_per_wakeup": step["datagrams_per_wakeup"],
            "loss": step["loss"], "shares": shares,
            "us_per_datagram": {k: round(v * cpu, 3) for k, v in shares.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=int, nargs="+", default=[50_000, 250_000])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("perf is needed (Debian: apt-get install linux-perf)")
    if not (all(1000 <= r <= 500_000 for r in args.rates) and 1 <= args.seconds <= 20 and 1 <= args.rounds <= 5):
        ap.error("--rates 1000..500000, --seconds 1..20, --rounds 1..5")
    tools = build_tools()
    target_cpu, load_cpu = choose_cpus(False)
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    scenarios = {"fwd-100": CACHED_DISTINCT, "cold-1m": COLD_DISTINCT}
    budget = len(scenarios) * len(args.rates) * args.rounds * 2 * (args.seconds + 40) + 120
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="quiclb-perf-") as tmp:
        work = Path(tmp)
        bench = Bench(blast=tools["udp_blast"], host=HOST, load_cpu=load_cpu, deadline=time.monotonic() + budget)
        env = Env(tools=tools, host=HOST, target_cpu=target_cpu, load_cpu=load_cpu, work=work, bench=bench,
                  nginx=(None, None), io_choices=[], probe_seconds=1, step_seconds=1, cpu_seconds=args.seconds,
                  rounds=args.rounds, fixed_rate=args.rates[0], max_seconds=budget)
        for name, distinct in scenarios.items():
            sc = Scenario(name, name, SINGLE_PASS, 100, distinct, "forward", [])
            load = Load(name, ["--heads", str(heads_file(SINGLE_PASS, distinct, SEED + distinct)), "--size", "100"],
                        distinct)
            sink = Sink(tools["udp_sink"], HOST, 3, load_cpu, budget + 60)
            targets: list[Target] = []
            try:
                for kind in ("c-forward", "quiclb"):
                    t = make_target(env, sc, kind, sink.ports, free_udp_port(HOST))
                    t.start()
                    targets.append(t)
                steps: dict[str, list[dict[str, Any]]] = {f"{t.name}@{r}": [] for t in targets for r in args.rates}
                for rnd in range(args.rounds):
                    for rate in args.rates:
                        for t in targets[rnd % 2:] + targets[: rnd % 2]:
                            steps[f"{t.name}@{rate}"].append(profiled_step(bench, t, load, sink, rate, args.seconds,
                                                                            work))
                            print(f"{name} {t.name} {rate}/s: {steps[f'{t.name}@{rate}'][-1]['us_per_datagram']}",
                                  file=sys.stderr)
            finally:
                for t in targets:
                    t.stop()
                sink.stop()
            results[name] = steps
    doc = run_metadata("perf_profile")
    doc.update(rates=args.rates, seconds=args.seconds, rounds=args.rounds, summary=summarize(results),
               steps=results)
    for line in doc["summary"]["lines"]:
        print(line)
    if args.save:
        print(f"wrote {write_result(doc)}")
    return 0


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Medians over the rounds of each (scenario, target@rate): µs per datagram by group."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    lines = []
    for scenario, steps in results.items():
        table[scenario] = {}
        for key, rounds in steps.items():
            groups = rounds[0]["us_per_datagram"].keys()
            med = {g: round(statistics.median(r["us_per_datagram"][g] for r in rounds), 3) for g in groups}
            med["total"] = round(statistics.median(r["cpu_us_per_datagram"] for r in rounds), 3)
            table[scenario][key] = med
            lines.append(f"{scenario:8s} {key:18s} total {med['total']:5.2f} us = "
                         + " + ".join(f"{g} {med[g]:.2f}" for g in groups))
    return {"us_per_datagram": table, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
