"""Micro-benchmark: Router.route_batch on a cold decode cache, µs per datagram (in process, no sockets).

The load bench's ``cold-1m`` and ``fourpass-1m`` scenarios in miniature:
batches of 64 short headers whose DCIDs are all new (each decodes to a live
backend), laid out in 2048-byte slots as the recvmmsg adapter lays them out,
routed by one ``route_batch`` each. Per configuration (single pass 2+14, four
pass 3+4) and cache (full at 65536 entries, so every miss also evicts; and
off), the median of --repeats runs of --batches batches, with min..max.
A cached batch (every DCID hit) is measured beside them as the floor.

With ``--baseline DIR`` (a checkout of another commit, e.g. a ``git worktree``)
each repeat runs once against this tree and once against DIR's ``lb``, in
alternating order, each in a fresh process; the result holds both and the
ratios of their medians.

    .venv/bin/python bench/micro_cold.py [--repeats 5] [--batches 400] [--baseline DIR] [--save]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from results_file import run_metadata, write_result

from lb import CidConfig, encode_cid
from lb.core.router import Router
from lb.core.service_table import Backend, build_service_table
from quiclb_harness.datagrams import short_header

BATCH, STRIDE, CACHE = 64, 2048, 65536
KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")
CONFIGS = {"single pass 2+14": CidConfig(0, 2, 14, KEY), "four pass 3+4": CidConfig(0, 3, 4, KEY)}


def batches_of(cfg: CidConfig, count: int, rng: random.Random) -> list[tuple[memoryview, bytes]]:
    sids = [(k).to_bytes(cfg.server_id_len, "big") for k in (1, 2, 3)]
    out = []
    for _ in range(count):
        buf = bytearray(BATCH * STRIDE)
        for i in range(BATCH):
            cid = encode_cid(cfg, server_id=rng.choice(sids), nonce=rng.randbytes(cfg.nonce_len))
            d = short_header(cid, payload_len=80)
            buf[i * STRIDE : i * STRIDE + len(d)] = d
        raw = bytes(buf)
        out.append((memoryview(raw), raw))
    return out


def run(cfg: CidConfig, cache: int, warm: list[tuple[memoryview, bytes]],
        timed: list[tuple[memoryview, bytes]], *, cached: bool) -> float:
    sids = [(k).to_bytes(cfg.server_id_len, "big") for k in (1, 2, 3)]
    table = build_service_table(name="bench", vip=("127.0.0.1", 4433), cid_configs=[cfg], fallback_key=bytes(32),
                                maglev_size=1009,
                                backends=[Backend(s, ("127.0.0.1", 5000 + k)) for k, s in enumerate(sids)])
    router = Router(table, cache_size=cache)
    lengths = [100] * BATCH

    def client(i: int) -> tuple[str, int]:
        return ("127.0.0.1", 40000)

    for view, raw in warm:  # fills the cache: every timed miss then evicts one entry
        router.route_batch(view, STRIDE, lengths, client, raw)
    if cached:
        timed = timed[:1] * len(timed)
        router.route_batch(timed[0][0], STRIDE, lengths, client, timed[0][1])
    t0 = time.perf_counter()
    for view, raw in timed:
        router.route_batch(view, STRIDE, lengths, client, raw)
    return (time.perf_counter() - t0) / (len(timed) * BATCH) * 1e6


CASES = (("cold, cache full", CACHE, False), ("cold, no cache", 0, False), ("all cached (floor)", CACHE, True))


def one_repeat(batches: int) -> dict[str, float]:
    """Every (configuration, case) once: µs per datagram, keyed "configuration / case"."""
    rng = random.Random(8)
    out = {}
    for name, cfg in CONFIGS.items():
        warm = batches_of(cfg, CACHE // BATCH + 1, rng)
        for case, cache, cached in CASES:
            out[f"{name} / {case}"] = run(cfg, cache, warm, batches_of(cfg, batches, rng), cached=cached)
    return out


def in_process(tree: Path, batches: int) -> dict[str, float]:
    """One repeat in a fresh interpreter whose ``lb`` comes from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, __file__, "--one", "--batches", str(batches)], env=env, check=True,
                          capture_output=True, text=True, timeout=300)
    return dict(json.loads(done.stdout.splitlines()[-1]))


def summary(runs: list[dict[str, float]]) -> dict[str, list[float]]:
    return {key: [round(statistics.median(r[key] for r in runs), 3), round(min(r[key] for r in runs), 3),
                  round(max(r[key] for r in runs), 3)] for key in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--baseline", type=Path, help="a checkout of the commit to compare with")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one repeat, JSON on stdout
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    repeats, batches = max(1, min(args.repeats, 20)), max(10, min(args.batches, 2000))
    if args.one:
        print(json.dumps(one_repeat(batches)))
        return
    here = Path(__file__).resolve().parent.parent
    trees = {"this": here} if args.baseline is None else {"this": here, "baseline": args.baseline.resolve()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(repeats):
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):  # interleaved, order alternating
            runs[name].append(in_process(trees[name], batches))
            print(f"repeat {r + 1}/{repeats}: {name} done", file=sys.stderr)
    results = {name: summary(rs) for name, rs in runs.items()}
    doc: dict[str, Any] = {**run_metadata("micro_cold"), "unit": "µs per datagram [median, min, max]",
                           "batch": BATCH, "repeats": repeats, "batches": batches, "results": results}
    if args.baseline is not None:
        base = subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=False).stdout.strip()
        doc["baseline_commit"] = base
        doc["this_over_baseline"] = {k: round(results["this"][k][0] / results["baseline"][k][0], 3)
                                     for k in results["this"]}
    for key in results["this"]:
        line = f"{key:40s} " + "  ".join(f"{name} {results[name][key][0]:6.3f} µs" for name in trees)
        if args.baseline is not None:
            line += f"  ratio {doc['this_over_baseline'][key]:.2f}"
        print(line)
    if args.save:
        print(f"wrote {write_result(doc)}")


if __name__ == "__main__":
    main()
