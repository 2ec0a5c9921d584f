"""Maglev fallback quality: balance, build time and churn on add/remove.

For each backend count N it builds the keyed Maglev table (lb.core.maglev)
and reports:

* balance: each backend's share of random 4-tuple flow keys against the ideal
  1/N (min/max ratio, p1/p50/p99 ratio, coefficient of variation), and the
  exact slot-count spread;
* build time: median and spread (min/max) over repeated builds;
* churn: share of keys (and slots) that change backend when one backend is
  added (compare with 1/(N+1)) and, among keys not on a removed backend, the
  share that move when it is removed (ideal 0).

Usage::

    python bench/hash_quality.py                       # JSON to stdout
    python bench/hash_quality.py --save                # also bench/results/hash_quality-<time>.json
    python bench/hash_quality.py --ns 3 5 --keys 20000 --size 655373

Runtime is bounded (about 15-30 s with the defaults on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lb.core.maglev import (
    DEFAULT_TABLE_SIZE,
    build_maglev_table,
    four_tuple_key,
    keyed_hash64,
    moved_fraction,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VIP = ("192.0.2.10", 443)


def names_for(n: int) -> list[bytes]:
    return [(0x0100 + i).to_bytes(2, "big") for i in range(n)]


def random_flow_keys(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [
        four_tuple_key((".".join(str(rng.randrange(256)) for _ in range(4)), rng.randrange(1024, 65536)), VIP)
        for _ in range(count)
    ]


def percentile(sorted_values: list[float], q: float) -> float:
    # Nearest-rank percentile: enough for a handful of backends, no numpy needed.
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def balance(n: int, key: bytes, size: int, hashes: list[int]) -> dict[str, Any]:
    names = names_for(n)
    table = build_maglev_table(names, key, size)
    counts = Counter(table.lookup_hash(h) for h in hashes)
    ideal = len(hashes) / n
    ratios = sorted(counts.get(name, 0) / ideal for name in names)
    slot_counts = Counter(table.slots).values()
    return {
        "share_ratio_min": round(ratios[0], 4),
        "share_ratio_p1": round(percentile(ratios, 1), 4),
        "share_ratio_p50": round(percentile(ratios, 50), 4),
        "share_ratio_p99": round(percentile(ratios, 99), 4),
        "share_ratio_max": round(ratios[-1], 4),
        "cov": round(statistics.pstdev(ratios) / statistics.fmean(ratios), 5),
        "slot_count_min": min(slot_counts),
        "slot_count_max": max(slot_counts),
    }


def build_times(n: int, key: bytes, size: int, repeats: int) -> dict[str, Any]:
    names = names_for(n)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        build_maglev_table(names, key, size)
        samples.append(time.perf_counter() - start)
    return {
        "n": n,
        "size": size,
        "repeats": repeats,
        "median_s": round(statistics.median(samples), 4),
        "min_s": round(min(samples), 4),
        "max_s": round(max(samples), 4),
    }


def churn(n: int, key: bytes, size: int, hashes: list[int]) -> dict[str, Any]:
    names = names_for(n + 1)
    base = build_maglev_table(names[:n], key, size)
    added = build_maglev_table(names, key, size)
    removed_name = names[n // 2]
    removed = build_maglev_table([x for x in names[:n] if x != removed_name], key, size)

    before = [base.lookup_hash(h) for h in hashes]
    moved_add = sum(1 for h, b in zip(hashes, before, strict=True) if added.lookup_hash(h) != b)
    kept = [(h, b) for h, b in zip(hashes, before, strict=True) if b != removed_name]
    moved_remove = sum(1 for h, b in kept if removed.lookup_hash(h) != b)
    return {
        "add_moved_keys": round(moved_add / len(hashes), 5),
        "add_moved_slots": round(moved_fraction(base, added), 5),
        "add_ideal": round(1 / (n + 1), 5),
        "remove_moved_unrelated_keys": round(moved_remove / len(kept), 5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--ns", type=int, nargs="+", default=[3, 5, 10, 20, 50], help="backend counts")
    parser.add_argument("--size", type=int, default=DEFAULT_TABLE_SIZE, help="Maglev table size (prime)")
    parser.add_argument("--keys", type=int, default=100_000, help="random flow keys per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="builds per build-time measurement")
    parser.add_argument("--build-n", type=int, default=100, help="extra N for the build-time measurement")
    parser.add_argument("--seed", type=int, default=1, help="seed for flow keys and the table key")
    parser.add_argument("--save", action="store_true", help="also write JSON under bench/results/")
    args = parser.parse_args(argv)

    # A fixed, seed-derived key keeps runs comparable; real deployments use a secret.
    key = keyed_hash64(b"", str(args.seed).encode()).to_bytes(8, "big") * 4
    started = time.perf_counter()
    flow_keys = random_flow_keys(args.keys, args.seed)
    probe = build_maglev_table([b"x"], key, args.size)
    hashes = [probe.flow_hash(k) for k in flow_keys]

    per_n = []
    for n in args.ns:
        per_n.append(
            {
                "n": n,
                "balance": balance(n, key, args.size, hashes),
                "build": build_times(n, key, args.size, args.repeats),
                "churn": churn(n, key, args.size, hashes),
            }
        )
    result = {
        "benchmark": "hash_quality",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "size": args.size,
        "keys": args.keys,
        "seed": args.seed,
        "results": per_n,
        "build_time_reference": build_times(args.build_n, key, args.size, args.repeats),
        "elapsed_s": 0.0,
    }
    result["elapsed_s"] = round(time.perf_counter() - started, 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"hash_quality-{time.strftime('%Y%m%dT%H%M%S')}.json"
        path.write_text(text + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
