"""Load benchmark: quiclb's CPU time per datagram and capacity beside a C forwarder and nginx, same run.

Primary figure: CPU time of the target's process tree (schedstat, ns) per
datagram delivered, at one fixed offered rate that every target sustains,
targets interleaved round by round; medians and min..max. Beside it:
capacity, the highest offered rate with <= 0.1% loss (fast search: one
unpaced probe, gallop, bisect to 5%). Traffic comes from a C sendmmsg
generator of prebuilt datagrams; a figure is marked generator-bound when
the generator could not offer more, or the C ceiling was not saturated.

Scenarios (``--full``, the default): 100 B and 1200 B forward path with
cached DCIDs; 1M distinct DCIDs (cold decode cache) single pass and four
pass (3+4); return path (sinks answer through the LB's inside port); a mix
with 5% Initials and 1% garbage; then added latency at 1k/s (round trip,
direct vs through the LB) and RSS while 1M DCIDs stream through quiclb.
``--quick``: the 100 B forward scenario only, c-forward / nginx / quiclb,
short steps, then 10 s of RSS with 1M DCIDs; writes bench/results/quick.json
(under 2 minutes).

Loopback only (127.0.0.0/8). Every load is bounded in datagrams and time;
the run by ``--max-seconds``; every process is ours and stopped by PID.
Progress goes to stderr, one line per step::

    .venv/bin/python bench/load_bench.py --quick
    .venv/bin/python bench/load_bench.py --full --out bench/reference/load.json
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadbench.measure import LAG_OK, LOSS_OK, Bench
from loadbench.plot import write_plot
from loadbench.procstat import choose_cpus
from loadbench.scenarios import (
    CACHED_DISTINCT,
    COLD_DISTINCT,
    FOUR_PASS,
    SINGLE_PASS,
    Env,
    Scenario,
    run_latency,
    run_rss,
    run_scenario,
)
from loadbench.targets import lb_io_choices, nginx_setup
from loadbench.tools import build_tools
from results_file import RESULTS, run_metadata

BASELINES = ["c-forward", "nginx-default", "quiclb"]
QUICK_RSS_SECONDS = 10.0  # quick: RSS with 1M DCIDs for 10 s (full: --rss-seconds, 60 s)


def full_plan(io_choices: list[str]) -> list[Scenario]:
    io = [f"quiclb-io-{c}" for c in io_choices]
    return [
        Scenario("fwd-100", "forward, 100 B, 4096 cached DCIDs, single pass 2+14", SINGLE_PASS, 100,
                 CACHED_DISTINCT, "forward", [*BASELINES, *io, "quiclb-workers2"]),
        Scenario("fwd-1200", "forward, 1200 B, 4096 cached DCIDs", SINGLE_PASS, 1200, CACHED_DISTINCT, "forward",
                 BASELINES),
        Scenario("cold-1m", "forward, 100 B, 1M distinct DCIDs (cache misses), single pass 2+14", SINGLE_PASS, 100,
                 COLD_DISTINCT, "forward", ["c-forward", "quiclb"]),
        Scenario("fourpass-1m", "forward, 100 B, 1M distinct DCIDs, four pass 3+4", FOUR_PASS, 100, COLD_DISTINCT,
                 "forward", ["c-forward", "quiclb"]),
        Scenario("return-100", "round trip, 100 B: sinks reply through the inside port (PROXY v2), LB strips it",
                 SINGLE_PASS, 100, CACHED_DISTINCT, "return", BASELINES),
        Scenario("mix-100", "forward, 100 B + 5% Initials (1200 B, fallback) + 1% garbage (dropped by quiclb)",
                 SINGLE_PASS, 100, CACHED_DISTINCT, "forward", ["c-forward", "quiclb"], mix=True),
    ]


def quick_plan() -> list[Scenario]:
    return [Scenario("fwd-100", "forward, 100 B, 4096 cached DCIDs, single pass 2+14", SINGLE_PASS, 100,
                     CACHED_DISTINCT, "forward", BASELINES)]


def require_loopback(host: str) -> str:
    addr = ipaddress.ip_address(host)
    if addr.version != 4 or not addr.is_loopback:
        raise SystemExit(f"refusing {host}: loopback IPv4 only (127.0.0.0/8)")
    return host


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


def quick_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """The contract keys of quick.json: capacity ratios and CPU per datagram, fwd-100, same run."""
    sc = next((s for s in doc["scenarios"] if s["scenario"] == "fwd-100"), None)
    out: dict[str, Any] = {}
    if sc is None:
        return out
    t = sc["targets"]
    for key, name in (("quiclb", "quiclb"), ("nginx", "nginx-default"), ("ceiling", "c-forward")):
        if name in t:
            out[f"{key}_pps"] = t[name]["capacity"]["capacity"]
            out[f"{key}_cpu_us"] = t[name].get("cpu", {}).get("cpu_us_median")
            out[f"{key}_generator_bound"] = t[name]["capacity"]["generator_bound"]
    for den in ("nginx", "ceiling"):
        if out.get("quiclb_pps") and out.get(f"{den}_pps"):
            out[f"quiclb_over_{den}"] = round(out["quiclb_pps"] / out[f"{den}_pps"], 3)
            if out.get(f"{den}_cpu_us"):
                out[f"quiclb_cpu_over_{den}"] = round(out["quiclb_cpu_us"] / out[f"{den}_cpu_us"], 3)
    q = t.get("quiclb", {}).get("cpu", {})
    for den, base in (("ceiling", "c-forward"), ("nginx", "nginx-default")):
        if f"over_{base}_paired_median" in q:
            out[f"quiclb_cpu_over_{den}_paired"] = q[f"over_{base}_paired_median"]
    out["fixed_rate"] = sc.get("fixed_rate")
    rss = doc.get("rss")
    if rss:
        out["quiclb_rss_mb_1m_cids"] = round(rss["rss_max"] / 2**20, 1)
        out["quiclb_rss_growth_mb"] = round(rss["growth_second_half"] / 2**20, 1)
    out["ceiling_generator_bound"] = sc.get("ceiling_generator_bound")
    return out


def print_table(doc: dict[str, Any]) -> None:
    print(f"\n{'scenario':12s} {'target':18s} {'cpu us/dgram':>13s} {'[min..max]':>15s} {'capacity':>10s}  notes")
    for sc in doc["scenarios"]:
        for name, t in sc["targets"].items():
            cpu, cap = t.get("cpu", {}), t["capacity"]
            notes = []
            if cap["generator_bound"]:
                notes.append("generator-bound (>=)")
            if cpu and not cpu["all_passed"]:
                notes.append(f"lost at the fixed rate (max {cpu['max_loss']:.2%})")
            if cpu and cpu["max_lag"] > LAG_OK:
                notes.append(f"fell behind at the fixed rate (lag up to {cpu['max_lag']:.1%}: CPU contention?)")
            med = cpu.get("cpu_us_median")
            spread = f"[{cpu.get('cpu_us_min') or 0:.2f}..{cpu.get('cpu_us_max') or 0:.2f}]"
            print(f"{sc['scenario']:12s} {name:18s} {med if med is not None else float('nan'):13.2f} {spread:>15s} "
                  f"{cap['capacity'] / 1000:9.1f}k  {'; '.join(notes)}")
        if sc.get("ceiling_generator_bound"):
            print(f"{sc['scenario']:12s} note: the C ceiling was not saturated (generator-bound): ratios to it are "
                  "upper bounds")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fwd-100 only, short steps: bench/results/quick.json")
    mode.add_argument("--full", action="store_true", help="every scenario, latency and RSS (the default)")
    ap.add_argument("--scenarios", nargs="+",
                    help="run only these scenarios of the plan (by name; also 'latency', 'rss')")
    ap.add_argument("--targets", nargs="+", help="keep only these targets in each scenario (e.g. c-forward quiclb)")
    ap.add_argument("--fixed-rate", type=int, help="datagrams/s for the CPU rounds (default: picked per scenario)")
    ap.add_argument("--rounds", type=int, help="interleaved CPU rounds per scenario (quick 3, full 5)")
    ap.add_argument("--step-seconds", type=float, help="capacity step length (quick 1, full 2)")
    ap.add_argument("--cpu-seconds", type=float, help="CPU round step length (quick 2, full 3)")
    ap.add_argument("--rss-seconds", type=float, default=60.0,
                    help="length of the RSS run (quick: at most 10 s; 0 skips)")
    ap.add_argument("--latency-count", type=int, default=3000, help="pings per target and round (0 skips)")
    ap.add_argument("--max-seconds", type=float, help="wall-clock limit (quick 110, full 1500)")
    ap.add_argument("--host", default="127.0.0.1", help="loopback IPv4 address for every socket")
    ap.add_argument("--nginx", help="nginx binary (default: from PATH)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin target / load to CPUs 0 / 1")
    ap.add_argument("--rebuild", action="store_true", help="recompile the C tools")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/quick.json or load-<time>.json); "
                                             "the PNG goes beside it")
    args = ap.parse_args()
    host = require_loopback(args.host)
    quick = args.quick
    max_seconds = args.max_seconds or (110.0 if quick else 1500.0)
    if not 10 <= max_seconds <= 3600:
        ap.error("--max-seconds must be 10..3600")
    if args.fixed_rate is not None and not 1000 <= args.fixed_rate <= 2_000_000:
        ap.error("--fixed-rate must be 1000..2000000")
    started_at = time.monotonic()
    tools = build_tools(args.rebuild)
    target_cpu, load_cpu = choose_cpus(args.no_pin)
    if load_cpu is not None:
        # This process (and the sink's drain threads) stays off the target's CPU; every child it
        # starts inherits this and is then pinned explicitly (targets) or by its --cpu (C tools).
        os.sched_setaffinity(0, {load_cpu})
    nginx_exe, module, nginx_version = nginx_setup(args.nginx)
    io_choices = lb_io_choices()
    plan = quick_plan() if quick else full_plan(io_choices)
    notes: list[str] = []
    if nginx_exe is None:
        notes.append(f"nginx skipped: {nginx_version}")
        for sc in plan:
            sc.targets = [t for t in sc.targets if not t.startswith("nginx")]
    if args.scenarios:
        plan = [sc for sc in plan if sc.name in args.scenarios]
    if args.targets:
        for sc in plan:
            sc.targets = [t for t in sc.targets if t in args.targets]
        plan = [sc for sc in plan if sc.targets]
    rounds = args.rounds or (3 if quick else 5)
    if not 1 <= rounds <= 20:
        ap.error("--rounds must be 1..20")
    if any(x is not None and not 0.5 <= x <= 30 for x in (args.step_seconds, args.cpu_seconds)):
        ap.error("--step-seconds and --cpu-seconds must be 0.5..30")
    print(f"load bench ({'quick' if quick else 'full'}): {', '.join(sc.name for sc in plan)}; pinning "
          + (f"target CPU {target_cpu}, generator+sinks CPU {load_cpu}" if target_cpu is not None else "off")
          + f"; at most {max_seconds:.0f} s", file=sys.stderr, flush=True)

    meta = run_metadata("load_quick" if quick else "load")
    doc: dict[str, Any] = {
        **meta,
        "kind": "load",
        "mode": "quick" if quick else "full",
        "dirty": bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "lb"],
                                     capture_output=True, text=True, check=False).stdout.strip()),
        "uname": " ".join(platform.uname()),
        "nginx": nginx_version if nginx_exe else None,
        "lb_io_choices": io_choices,
        "pinning": {"target_cpu": target_cpu, "generator_and_sinks_cpu": load_cpu},
        "loss_ok": LOSS_OK,
        "lag_ok": LAG_OK,
        "unit": "cpu_us: target CPU microseconds per delivered datagram; capacity: datagrams/s offered",
        "scenarios": [],
    }
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="quiclb-load-") as tmp:
        env = Env(tools=tools, host=host, target_cpu=target_cpu, load_cpu=load_cpu, work=Path(tmp),
                  bench=Bench(tools["udp_blast"], host, load_cpu, started_at + max_seconds),
                  nginx=(nginx_exe, module), io_choices=io_choices, probe_seconds=1.0,
                  step_seconds=args.step_seconds or (1.0 if quick else 2.0),
                  cpu_seconds=args.cpu_seconds or (2.0 if quick else 3.0), rounds=rounds,
                  fixed_rate=args.fixed_rate, max_seconds=max_seconds, notes=notes)
        doc["timing"] = {"probe_seconds": env.probe_seconds, "step_seconds": env.step_seconds,
                         "cpu_step_seconds": env.cpu_seconds, "rounds": rounds}
        try:
            for sc in plan:
                try:
                    doc["scenarios"].append(run_scenario(env, sc))
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    notes.append(f"{sc.name} failed: {str(e).splitlines()[0]}")
                    env.log(f"  FAILED: {e}")
            wanted = set(args.scenarios or ["latency", "rss"])
            if not quick and "latency" in wanted and args.latency_count > 0:
                doc["latency"] = run_latency(env, args.latency_count)
            if "rss" in wanted and args.rss_seconds > 0:
                # At most the rate quiclb sustained with 1M CIDs, so the RSS run is not an overload test.
                cold = [s["fixed_rate"] for s in doc["scenarios"] if s["scenario"] == "cold-1m"]
                rss_seconds = min(args.rss_seconds, QUICK_RSS_SECONDS) if quick else args.rss_seconds
                doc["rss"] = run_rss(env, rss_seconds, min([20_000 if quick else 30_000, *cold]))
        except TimeoutError as e:
            notes.append(f"stopped early: {e}; results are partial")
    doc["notes"] = notes
    doc["elapsed_seconds"] = round(time.monotonic() - started_at, 1)
    if quick:
        doc.update(quick_summary(doc))
    print_table(doc)
    for n in notes:
        print(f"note: {n}")
    out = args.out or (RESULTS / ("quick.json" if quick else f"load-{time.strftime('%Y%m%dT%H%M%S')}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    png = write_plot(doc, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {png}" if png else "") + f" in {doc['elapsed_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parents[1])  # git commit and relative paths from the repository root
    sys.exit(main())
