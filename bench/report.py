"""Generate the README's performance table from the reference load run (bench/reference/load.json).

The table is never typed by hand: this script rewrites the part of README.md
between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` from the JSON that
``make bench-reference`` wrote, including the commit and machine it ran on
and which of issue 8's targets it meets. ``--check`` only compares (exit 1
when the README is stale), ``--print`` writes the section to stdout.

    .venv/bin/python bench/report.py                  # rewrite README.md
    .venv/bin/python bench/report.py --check
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "bench" / "reference" / "load.json"
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
TARGET_LABELS = {
    "c-forward": "C forwarder (ceiling)",
    "nginx-default": "nginx stream, default",
    "quiclb": "quiclb (default I/O)",
    "quiclb-workers2": "quiclb --workers 2 (unpinned)",
}


def _k(rate: float) -> str:
    return f"{rate / 1000:.0f}k" if rate >= 10_000 else f"{rate / 1000:.1f}k"


def _label(name: str) -> str:
    if name.startswith("quiclb-io-"):
        return f"quiclb --io {name.removeprefix('quiclb-io-')}"
    return TARGET_LABELS.get(name, name)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def target_checks(doc: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Issue 8's targets: (what, measured, met?). None = not measured in this run."""
    sc = {s["scenario"]: s["targets"] for s in doc["scenarios"]}

    def cap(scn: str, t: str) -> float | None:
        v = sc.get(scn, {}).get(t, {}).get("capacity", {}).get("capacity")
        return None if v is None else float(v)

    def cpu(scn: str, t: str) -> float | None:
        v = sc.get(scn, {}).get(t, {}).get("cpu", {}).get("cpu_us_median")
        return None if v is None else float(v)

    checks: list[tuple[str, str, bool | None]] = []

    def ratio_check(what: str, r: float | None, op: str, limit: float) -> None:
        met = None if r is None else (r >= limit if op == ">=" else r <= limit)
        checks.append((f"{what} {op} {limit}x", "-" if r is None else f"{r:.2f}x", met))

    ratio_check("forward 100 B capacity vs C", _ratio(cap("fwd-100", "quiclb"), cap("fwd-100", "c-forward")),
                ">=", 0.85)
    ratio_check("forward 100 B capacity vs nginx", _ratio(cap("fwd-100", "quiclb"), cap("fwd-100", "nginx-default")),
                ">=", 1.15)
    paired = sc.get("fwd-100", {}).get("quiclb", {}).get("cpu", {}).get("over_c-forward_paired_median")
    ratio_check("forward 100 B CPU/datagram vs C (paired)",
                paired or _ratio(cpu("fwd-100", "quiclb"), cpu("fwd-100", "c-forward")), "<=", 1.15)
    ratio_check("return path capacity vs C", _ratio(cap("return-100", "quiclb"), cap("return-100", "c-forward")),
                ">=", 0.85)
    ratio_check("cold cache (1M CIDs) capacity vs C", _ratio(cap("cold-1m", "quiclb"), cap("cold-1m", "c-forward")),
                ">=", 0.75)
    ratio_check("four pass, 1M CIDs, capacity vs C",
                _ratio(cap("fourpass-1m", "quiclb"), cap("fourpass-1m", "c-forward")), ">=", 0.70)
    lat = doc.get("latency")
    for q, limit in (("p50", 50), ("p99", 250)):
        v = lat.get(f"quiclb_added_{q}_us") if lat else None
        checks.append((f"added latency {q} <= {limit} us", "-" if v is None else f"{v:.0f} us",
                       None if v is None else v <= limit))
    rss = doc.get("rss")
    if rss:
        mb, growth = rss["rss_max"] / 2**20, rss["growth_second_half"] / 2**20
        checks.append(("RSS with 1M CIDs <= 200 MB, no growth",
                       f"{mb:.0f} MiB, {growth:+.1f} MiB over the 2nd half of {rss['seconds']:.0f} s",
                       mb <= 200 and growth < 2))
    else:
        checks.append(("RSS with 1M CIDs <= 200 MB, no growth", "-", None))
    return checks


def render(doc: dict[str, Any]) -> str:
    """The Markdown between the markers."""
    lines = [
        START,
        f"Reference run: commit `{doc.get('commit', '?')}`{' (with local changes)' if doc.get('dirty') else ''}, "
        f"`{doc.get('mode', '?')}` mode, {doc.get('cpus')} CPUs, Python {doc.get('python')}, "
        f"{doc.get('nginx') or 'no nginx'}; target pinned to CPU {doc['pinning']['target_cpu']}, generator and "
        f"sinks to CPU {doc['pinning']['generator_and_sinks_cpu']}. JSON and plot: `bench/reference/load.json`, "
        "`bench/reference/load.png`; reproduce with `make bench-reference` (this table: `make bench-report`).",
        "",
        "| scenario | target | CPU us/datagram [min..max] | CPU vs C (paired [min..max]) | capacity/s "
        "| capacity vs C | notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for sc in doc["scenarios"]:
        ts = sc["targets"]
        c_cpu = ts.get("c-forward", {}).get("cpu", {}).get("cpu_us_median")
        c_cap = ts.get("c-forward", {}).get("capacity", {}).get("capacity")
        for name, t in ts.items():
            cpu, cap = t.get("cpu", {}), t["capacity"]
            med = cpu.get("cpu_us_median")
            cpu_txt = "-" if med is None else f"{med:.2f} [{cpu['cpu_us_min']:.2f}..{cpu['cpu_us_max']:.2f}]"
            notes = []
            bound = cap["generator_bound"] or (name == "c-forward" and bool(sc.get("ceiling_generator_bound")))
            if bound:
                notes.append("generator-bound: capacity is a lower bound")
            if (cpu.get("others_on_target_cpu_median") or 0) > 0.2:
                notes.append(f"other tasks used {cpu['others_on_target_cpu_median']:.0%} of the target CPU")
            if cpu and not cpu.get("all_passed", True):
                notes.append(f"lost {cpu['max_loss']:.2%} at the fixed rate")
            r_cap = _ratio(cap["capacity"], c_cap)
            if "over_c-forward_paired_median" in cpu:
                r_txt = (f"{cpu['over_c-forward_paired_median']:.2f}x [{cpu['over_c-forward_paired_min']:.2f}.."
                         f"{cpu['over_c-forward_paired_max']:.2f}]")
            else:
                r_cpu = _ratio(med, c_cpu)
                r_txt = "-" if r_cpu is None else f"{r_cpu:.2f}x"
            lines.append(
                f"| {sc['scenario']} at {_k(sc['fixed_rate'])}/s | {_label(name)} | {cpu_txt} | {r_txt} | "
                f"{'>= ' if bound else ''}{_k(cap['capacity'])} | "
                f"{'-' if r_cap is None else f'{r_cap:.2f}x'} | {'; '.join(notes)} |"
            )
    lines.append("")
    lines.append("Scenarios: " + "; ".join(f"`{s['scenario']}` = {s['description']}" for s in doc["scenarios"])
                 + ". CPU is the target's process tree (schedstat) per delivered datagram at the fixed rate, "
                 "median of interleaved rounds; capacity is the highest offered rate with <= 0.1% loss.")
    if any(s.get("ceiling_generator_bound") for s in doc["scenarios"]):
        lines.append("The C forwarder was not saturated in "
                     + ", ".join(f"`{s['scenario']}`" for s in doc["scenarios"] if s.get("ceiling_generator_bound"))
                     + ": its capacity is the generator's (one CPU for generator, sinks and the loopback's receive "
                     "work), so capacity ratios to it are upper bounds; the CPU figures do not depend on it.")
    lat = doc.get("latency")
    if lat:
        lines += ["", f"Latency at {lat['rate']}/s, one datagram in flight, round trip (median of 2 rounds of "
                  f"{lat['count']}): direct echo p50 {lat['direct_p50_us']:.0f} us / p99 {lat['direct_p99_us']:.0f} "
                  f"us; through c-forward {lat['c-forward_p50_us']:.0f} / {lat['c-forward_p99_us']:.0f} us; through "
                  f"quiclb {lat['quiclb_p50_us']:.0f} / {lat['quiclb_p99_us']:.0f} us."]
    lines += ["", "| issue 8 target | measured | met |", "| --- | --- | --- |"]
    for what, measured, met in target_checks(doc):
        lines.append(f"| {what} | {measured} | {'not measured' if met is None else ('yes' if met else 'MISSED')} |")
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=REFERENCE, help="the run to report (default: the reference)")
    ap.add_argument("--readme", type=Path, default=README)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 if the README's section is not up to date")
    group.add_argument("--print", action="store_true", help="print the section instead of writing the README")
    args = ap.parse_args()
    section = render(json.loads(args.json.read_text()))
    if args.print:
        print(section)
        return 0
    text = args.readme.read_text()
    if START not in text or END not in text:
        print(f"{args.readme}: no {START} ... {END} markers in its Performance section", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    new = head + section + tail
    if args.check:
        if new != text:
            print(f"{args.readme}: the performance table is stale; run make bench-report", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
        print(f"rewrote the performance table in {args.readme} from {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
