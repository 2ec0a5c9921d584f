"""Where quiclb's CPU per datagram goes at a fixed rate, per wakeup, beside the C forwarder's (issue 8).

The load bench gives CPU per datagram; this splits quiclb's into what one
wakeup of the VIP socket costs: the recvmmsg and sendmmsg system calls, the
Python of ``readable()`` between them (routing, the send array), and the CPU
the process spends outside ``readable()`` (the event loop's epoll and
callback dispatch, waking up and going back to sleep). The LB runs as
``bench/loadbench/timed_lb.py`` (``python -m lb`` with those calls wrapped
and timed); an untimed quiclb runs beside it to show what the wrappers cost.
Targets are interleaved round by round at one fixed rate, on the load
bench's pinning, generator, sinks and datagrams (100 B, 4096 cached DCIDs).

    .venv/bin/python bench/wakeup_profile.py [--rate 50000] [--seconds 3] [--rounds 3] [--save]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadbench.measure import Bench, Load
from loadbench.procstat import choose_cpus
from loadbench.scenarios import CACHED_DISTINCT, SEED, SINGLE_PASS, Env, Scenario, make_target
from loadbench.targets import ReadyTarget, Target, free_udp_port
from loadbench.tools import Sink, build_tools
from loadbench.traffic import heads_file
from results_file import run_metadata, write_result

HOST = "127.0.0.1"
TIMED = Path(__file__).parent / "loadbench" / "timed_lb.py"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=50_000)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    if not (1000 <= args.rate <= 500_000 and 0.5 <= args.seconds <= 30 and 1 <= args.rounds <= 10):
        ap.error("--rate 1000..500000, --seconds 0.5..30, --rounds 1..10")
    tools = build_tools()
    target_cpu, load_cpu = choose_cpus(False)
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    budget = args.rounds * 3 * (args.seconds + 5) + 60
    with tempfile.TemporaryDirectory(prefix="quiclb-wakeup-") as tmp:
        work, timing = Path(tmp), Path(tmp) / "timing.json"
        bench = Bench(blast=tools["udp_blast"], host=HOST, load_cpu=load_cpu, deadline=time.monotonic() + budget)
        env = Env(tools=tools, host=HOST, target_cpu=target_cpu, load_cpu=load_cpu, work=work, bench=bench,
                  nginx=(None, None), io_choices=[], probe_seconds=1, step_seconds=1, cpu_seconds=args.seconds,
                  rounds=args.rounds, fixed_rate=args.rate, max_seconds=budget)
        sc = Scenario("fwd-100", "forward, 100 B, 4096 cached DCIDs", SINGLE_PASS, 100, CACHED_DISTINCT,
                      "forward", [])
        load = Load(sc.name, ["--heads", str(heads_file(SINGLE_PASS, CACHED_DISTINCT, SEED + CACHED_DISTINCT)),
                              "--size", "100"], CACHED_DISTINCT)
        sink = Sink(tools["udp_sink"], HOST, 3, load_cpu, budget + 60)
        targets: list[Target] = []
        try:
            for name in ("c-forward", "quiclb", "quiclb-timed"):
                t = make_target(env, sc, name.removesuffix("-timed"), sink.ports, free_udp_port(HOST))
                if name == "quiclb-timed":
                    assert isinstance(t, ReadyTarget)
                    t.name, t.argv = name, [sys.executable, str(TIMED), *t.argv[3:]]  # drop "-m lb"
                    os.environ["QUICLB_TIMING_OUT"] = str(timing)
                t.start()
                os.environ.pop("QUICLB_TIMING_OUT", None)
                targets.append(t)
            steps: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
            for r in range(args.rounds):
                for t in targets[r % 3:] + targets[: r % 3]:
                    steps[t.name].append(bench.step(t, load, sink, args.rate, args.seconds))
        finally:
            for t in targets:
                t.stop()  # SIGTERM: the timed LB writes its counts on the way out
            sink.stop()
        counts = json.loads(timing.read_text())
    doc = run_metadata("wakeup_profile")
    doc.update(rate=args.rate, seconds=args.seconds, rounds=args.rounds, counts=counts,
               **summarize(steps, counts))
    print(json.dumps({k: v for k, v in doc.items() if k not in ("counts", "steps")}, indent=1))
    if args.save:
        print(f"wrote {write_result(doc)}")
    return 0


def summarize(steps: dict[str, list[dict[str, Any]]], counts: dict[str, int]) -> dict[str, Any]:
    def cpu_us(name: str) -> float:
        return float(statistics.median(s["cpu_us_per_datagram"] for s in steps[name]))

    def per_wakeup(name: str) -> float:
        return float(statistics.median(s["datagrams_per_wakeup"] or 0.0 for s in steps[name]))

    w = counts["wakeups"] or 1
    us = 1 / 1000 / w
    recv, send = counts["recvmmsg_ns"] * us, counts["sendmmsg_ns"] * us
    python = (counts["readable_ns"] - counts["recvmmsg_ns"] - counts["sendmmsg_ns"]) * us
    outside = (counts["process_cpu_ns"] - counts["readable_cpu_ns"]) * us
    c_wakeup = cpu_us("c-forward") * per_wakeup("c-forward")
    return {
        "cpu_us_per_datagram": {name: round(cpu_us(name), 3) for name in steps},
        "datagrams_per_wakeup": {name: round(per_wakeup(name), 2) for name in steps},
        "quiclb_over_c_cpu": round(cpu_us("quiclb") / cpu_us("c-forward"), 3),
        # One wakeup of the timed LB, in µs (datagrams per readable() call: counts' own figure).
        "quiclb_timed_per_wakeup_us": {
            "datagrams": round(counts["datagrams"] / w, 2),
            "recvmmsg": round(recv, 2), "python_in_readable": round(python, 2), "sendmmsg": round(send, 2),
            "outside_readable_cpu": round(outside, 2), "total_cpu": round(counts["process_cpu_ns"] * us, 2),
        },
        "c_forward_per_wakeup_cpu_us": round(c_wakeup, 2),
        "steps": steps,
    }


if __name__ == "__main__":
    sys.exit(main())
