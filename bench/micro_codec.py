"""Micro-benchmark: in-process cost of decoding one CID, scalar and batched.

Measures ns per CID for plaintext, single-pass (n = 16) and four-pass (3 and 4
LB passes) configurations, with the scalar ``CidDecoder.decode`` and the batch
``CidDecoder.decode_many`` (one AES call per pass per batch). Each figure is
the median of ``--repeats`` runs, with min and max as the spread: the machine
is shared and noisy. Bounded: a few seconds in all.

    .venv/bin/python bench/micro_codec.py [--batch 64] [--repeats 7] [--save]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time

from results_file import run_metadata, write_result

from lb import CidConfig, encode_cid
from lb.core.cid_decoder import CidDecoder

KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")
CASES = {
    "plaintext 2+14": CidConfig(0, 2, 14),
    "single-pass 2+14": CidConfig(0, 2, 14, KEY),
    "four-pass 3+4 (3 AES)": CidConfig(0, 3, 4, KEY),
    "four-pass 10+5 (4 AES)": CidConfig(0, 10, 5, KEY),
    "four-pass 4+14 (3 AES)": CidConfig(0, 4, 14, KEY),
}


def time_per_item(fn: object, items: int, repeats: int) -> tuple[float, float, float]:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        runs.append((time.perf_counter() - t0) / items * 1e9)
    return statistics.median(runs), min(runs), max(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cids", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--save", action="store_true", help="also write bench/results/micro_codec-<time>.json")
    args = ap.parse_args()
    results = []
    for name, cfg in CASES.items():
        cids = [
            encode_cid(cfg, secrets.token_bytes(cfg.server_id_len), secrets.token_bytes(cfg.nonce_len))
            for _ in range(args.cids)
        ]
        dec = CidDecoder([cfg])
        batches = [cids[i : i + args.batch] for i in range(0, len(cids), args.batch)]
        decode, decode_many = dec.decode, dec.decode_many

        def scalar(cids: list[bytes] = cids, decode: object = decode) -> None:
            for c in cids:
                decode(c)  # type: ignore[operator]

        def batched(batches: list[list[bytes]] = batches, decode_many: object = decode_many) -> None:
            for b in batches:
                decode_many(b)  # type: ignore[operator]

        s = time_per_item(scalar, len(cids), args.repeats)
        b = time_per_item(batched, len(cids), args.repeats)
        results.append({"case": name, "lb_passes": cfg.lb_passes,
                        "scalar_ns": [round(x) for x in s], "batch_ns": [round(x) for x in b]})
        print(f"{name:26s} passes={cfg.lb_passes}  scalar {s[0]:7.0f} ns/CID [{s[1]:.0f}..{s[2]:.0f}]"
              f"   batch({args.batch}) {b[0]:7.0f} ns/CID [{b[1]:.0f}..{b[2]:.0f}]   ratio {s[0] / b[0]:.2f}x")
    doc = {**run_metadata("micro_codec"), "batch": args.batch, "unit": "ns per CID: [median, min, max]",
           "results": results}
    if args.save:
        write_result(doc)

if __name__ == "__main__":
    main()
