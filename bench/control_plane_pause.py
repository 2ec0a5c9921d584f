"""Longest datapath pause while the control plane rebuilds tables (issue 13 item 3; target <= 5 ms).

8 services of 6 backends with 65537-slot Maglev tables; 10 health flaps per
second, each marking a random set of one service's backends down (so rings
rarely repeat and nearly every flap costs a real Maglev build). The tables are
rebuilt by the LB's own :class:`TableUpdater` and swapped into routers. The
"datapath pause" is the lateness of a callback the event loop should run every
millisecond: while a build holds the loop (or the GIL), it cannot run, and
neither can a datagram callback. On a shared machine the OS adds its own
pauses, so ``idle`` (no flaps) is the baseline, and "loop CPU/tick" (CPU time
the loop thread itself spent in one tick) separates the pauses our process
causes from preemption. Compared: no flaps at all (``idle``: the
machine's own noise), rings built inline on the loop, in a thread, and in a
spawned process (what the LB uses).

    .venv/bin/python bench/control_plane_pause.py [--seconds 5] [--rounds 1] [--mode process] [--save]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from results_file import run_metadata, write_result

from lb.control.config import load_config
from lb.control.ring_worker import ring_executor
from lb.control.table_builder import TableBuilder
from lb.control.table_updater import TableUpdater
from lb.core.router import Router
from lb.core.service_table import ServiceTable
from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec

SERVICES = 8
BACKENDS = 6
FLAPS_PER_SECOND = 10
TICK = 0.001


def _workers(mode: str) -> Callable[[], Executor] | None:
    if mode == "thread":
        return lambda: ThreadPoolExecutor(max_workers=1)
    if mode == "process":
        return ring_executor  # the LB's own
    return None


async def measure(mode: str, seconds: float, directory: Path) -> dict[str, float]:
    dep = Deployment(directory=directory, admin=False, services=[
        ServiceSpec(name=f"svc{i}", backends=[BackendSpec(f"{j:04x}") for j in range(1, BACKENDS + 1)])
        for i in range(SERVICES)
    ])
    dep.write()
    cfg = load_config(dep.path)
    builder = TableBuilder(workers=_workers(mode))
    executor = builder.executor
    loop = asyncio.get_running_loop()
    routers = {name: Router(t) for name, t in (await builder.build_async(cfg, frozenset(), loop.time())).items()}
    if executor is not None:  # start the worker before measuring (the LB does it at start-up too)
        await builder.build_async(cfg, frozenset({("svc0", b"\x00\x01")}), loop.time())
    unhealthy: set[tuple[str, bytes]] = set()

    def install(tables: Mapping[str, ServiceTable]) -> None:
        for name, table in tables.items():
            routers[name].set_table(table)

    updater = TableUpdater(builder, inputs=lambda: (cfg, frozenset(unhealthy)), install=install)
    rng = random.Random(1)
    lateness: list[float] = []
    busy: list[float] = []  # CPU time of the loop's own thread per tick: the pause our process causes itself
    end = loop.time() + seconds
    next_flap = loop.time()
    flaps = 0
    while loop.time() < end:
        expected = loop.time() + TICK
        cpu = time.thread_time()
        await asyncio.sleep(TICK)
        lateness.append(loop.time() - expected)
        busy.append(time.thread_time() - cpu)
        if mode != "idle" and loop.time() >= next_flap:
            svc = rng.randrange(SERVICES)
            down = {bytes.fromhex(f"{j:04x}") for j in range(1, BACKENDS + 1) if rng.random() < 0.4}
            unhealthy -= {k for k in unhealthy if k[0] == f"svc{svc}"}
            unhealthy |= {(f"svc{svc}", sid) for sid in down}
            updater.request()
            flaps += 1
            next_flap += 1 / FLAPS_PER_SECOND
    await updater.idle()
    await updater.close()
    if executor is not None:
        executor.shutdown()
    lateness.sort()
    return {
        "max_pause_ms": lateness[-1] * 1000,
        "p99_pause_ms": lateness[int(len(lateness) * 0.99)] * 1000,
        "median_pause_ms": statistics.median(lateness) * 1000,
        "max_loop_cpu_per_tick_ms": max(busy) * 1000,
        "flaps": flaps,
        "ring_builds": builder.stats().fallback_table_builds,
        "table_updates": updater.updates,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of every mode, interleaved (idle, ..., idle, ...)")
    ap.add_argument("--mode", choices=["idle", "inline", "thread", "process", "all"], default="all")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    modes = ["idle", "inline", "thread", "process"] if args.mode == "all" else [args.mode]
    doc = run_metadata("control_plane_pause")
    doc.update(services=SERVICES, backends=BACKENDS, flaps_per_second=FLAPS_PER_SECOND, seconds=args.seconds,
               rounds=args.rounds)
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                result = asyncio.run(measure(mode, args.seconds, Path(tmp)))
            runs[mode].append(result)
            print(f"{mode:8s} longest pause {result['max_pause_ms']:7.2f} ms  p99 {result['p99_pause_ms']:6.2f} ms  "
                  f"median {result['median_pause_ms']:5.2f} ms  "
                  f"loop CPU/tick {result['max_loop_cpu_per_tick_ms']:6.2f} ms  "
                  f"flaps {result['flaps']}  ring builds "
                  f"{result['ring_builds']}  updates {result['table_updates']}  ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
    for mode, results in runs.items():
        # One round: its own figures (the earlier layout); several: every round, and a summary.
        doc[mode] = results[0] if len(results) == 1 else {
            "rounds": results,
            "max_pause_ms": max(r["max_pause_ms"] for r in results),
            "median_round_max_pause_ms": statistics.median(r["max_pause_ms"] for r in results),
            "max_loop_cpu_per_tick_ms": max(r["max_loop_cpu_per_tick_ms"] for r in results),
        }
        if len(results) > 1:
            print(f"{mode:8s} over {len(results)} rounds: longest pause {doc[mode]['max_pause_ms']:.2f} ms, median "
                  f"of the rounds' longest {doc[mode]['median_round_max_pause_ms']:.2f} ms, loop CPU/tick "
                  f"{doc[mode]['max_loop_cpu_per_tick_ms']:.2f} ms")
    if args.save:
        write_result(doc)


if __name__ == "__main__":
    main()
