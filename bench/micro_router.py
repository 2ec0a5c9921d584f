"""Micro-benchmark: in-process cost of Router.route per datagram, by kind of datagram.

Kinds: a short header whose DCID is in the decode cache (the steady state), a
short header with a fresh DCID (cache miss: one AES call, single pass), a
short header with garbage (dropped without AES), and a client Initial (keyed
Maglev fallback over the 4-tuple). Each figure is the median of --repeats runs
with min..max. Bounded: a few seconds.

    .venv/bin/python bench/micro_router.py [--repeats 7] [--save]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time

from results_file import run_metadata, write_result

from lb import CidConfig, encode_cid
from lb.core.router import Router
from lb.core.service_table import Backend, build_service_table
from quiclb_harness.datagrams import initial, short_header

N = 20_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    cfg = CidConfig(0, 2, 14, secrets.token_bytes(16))
    backends = [Backend(bytes([0, i]), ("127.0.0.1", 5000 + i)) for i in range(1, 4)]
    table = build_service_table(name="bench", vip=("127.0.0.1", 4433), cid_configs=[cfg], backends=backends,
                                fallback_key=secrets.token_bytes(32))
    client = ("127.0.0.1", 40000)
    hot_cids = [encode_cid(cfg, bytes([0, 1 + i % 3]), secrets.token_bytes(14)) for i in range(64)]
    kinds = {
        "short, cached DCID": [short_header(hot_cids[i % 64], payload_len=80) for i in range(N)],
        "short, new DCID (1 AES)": [short_header(encode_cid(cfg, bytes([0, 1 + i % 3]), secrets.token_bytes(14)),
                                                 payload_len=80) for i in range(N)],
        "short, garbage (0b111)": [b"\x40\xe7" + secrets.token_bytes(80) for _ in range(N)],
        "Initial, fallback": [initial(1, secrets.token_bytes(8), secrets.token_bytes(8)) for _ in range(N)],
    }
    results = []
    for name, datagrams in kinds.items():
        runs = []
        for _ in range(args.repeats):
            router = Router(table)
            if name.startswith("short, cached"):
                for d in datagrams[:64]:
                    router.route(d, client)
            route = router.route
            clients = [("127.0.0.1", 1024 + i % 60000) for i in range(len(datagrams))]
            t0 = time.perf_counter()
            for d, c in zip(datagrams, clients, strict=True):
                route(d, c)
            runs.append((time.perf_counter() - t0) / len(datagrams) * 1e9)
        med, lo, hi = statistics.median(runs), min(runs), max(runs)
        results.append({"kind": name, "ns": [round(med), round(lo), round(hi)]})
        print(f"{name:26s} {med:7.0f} ns/datagram [{lo:.0f}..{hi:.0f}]")
    doc = {**run_metadata("micro_router"), "unit": "ns per datagram [median, min, max]", "results": results}
    if args.save:
        write_result(doc)

if __name__ == "__main__":
    main()
