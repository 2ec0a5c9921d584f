"""Micro-benchmark: what Retry offload and stateless resets cost the LB's router, per datagram.

Each figure is the median of --rounds rounds of --n datagrams through
``Router.route`` (µs per datagram, with [min..max] over the rounds), against the
same Initial routed by the fallback with Retry off, measured in the same run:

* ``fallback_initial``: a tokenless 1200 B Initial, Retry off (the baseline);
* ``retry_sent``: the same Initial with ``retry = "always"``: a Retry built
  (token: AES-128-GCM; integrity tag: AES-128-GCM; a routable Retry SCID:
  one AES call) and queued;
* ``token_checked``: the client's second Initial, with the token: opened and
  routed by its CID;
* ``reset_sent``: a short header of a removed backend answered with a reset
  (one decode, one HMAC-SHA256).

Every datagram comes from its own source address, so the per-source limit never
applies.

    .venv/bin/python bench/micro_retry.py [--n 2000] [--rounds 7] [--save]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.packet import pull_quic_header
from results_file import run_metadata, write_result

from lb import CidConfig, encode_cid
from lb.core.lb_replies import RetryPolicy
from lb.core.retry_token import TokenKey
from lb.core.router import Router
from lb.core.service_table import Backend, build_service_table
from quiclb_harness.datagrams import initial, short_header

CFG = CidConfig(config_id=0, server_id_len=2, nonce_len=14, key=bytes(range(16)))
VIP = ("192.0.2.1", 443)
GONE = b"\x00\x09"


def router(retry: bool) -> Router:
    table = build_service_table(
        name="bench", vip=VIP, cid_configs=[CFG], fallback_key=bytes(32), tombstones=[GONE],
        backends=[Backend(bytes((0, k)), (f"10.0.0.{k}", 4000)) for k in (1, 2, 3)],
        retry=RetryPolicy("always", TokenKey.from_secret(bytes(range(16, 32))), 2000, CFG) if retry else None,
        reset_key=bytes(range(32, 48)),
    )
    return Router(table, clock=time.time)


def clients(n: int) -> list[tuple[str, int]]:
    return [(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1024 + i % 60000) for i in range(n)]


def per_datagram(router: Router, datagrams: list[bytes], addrs: list[tuple[str, int]]) -> float:
    """µs per datagram of ``router.route`` over the pairs (one timed loop)."""
    route = router.route
    t0 = time.perf_counter()
    for d, a in zip(datagrams, addrs, strict=True):
        route(d, a)
    return (time.perf_counter() - t0) / len(datagrams) * 1e6


def measure(n: int, rounds: int) -> dict[str, dict[str, float]]:
    results: dict[str, list[float]] = {k: [] for k in ("fallback_initial", "retry_sent", "token_checked",
                                                       "reset_sent")}
    for _ in range(rounds):
        addrs = clients(n)
        firsts = [initial(1, os.urandom(8), os.urandom(8)) for _ in range(n)]
        plain, guarded = router(False), router(True)
        results["fallback_initial"].append(per_datagram(plain, firsts, addrs))
        results["retry_sent"].append(per_datagram(guarded, firsts, addrs))
        seconds = []
        for (packet, _), d in zip(guarded.replies.take(), firsts, strict=True):
            h = pull_quic_header(Buffer(data=packet), host_cid_length=8)
            seconds.append(initial(1, h.source_cid, d[15:23], token=h.token))
        results["token_checked"].append(per_datagram(guarded, seconds, addrs))
        removed = [short_header(encode_cid(CFG, GONE, os.urandom(14)), payload_len=60) for _ in range(n)]
        results["reset_sent"].append(per_datagram(guarded, removed, addrs))
        stats = guarded.stats()
        assert stats.lb_originated == {"retry": n, "reset": n}, stats.lb_originated
        assert stats.retry_tokens == {"valid": n}, stats.retry_tokens
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    results = measure(max(100, min(args.n, 100_000)), max(1, min(args.rounds, 50)))
    for name, r in results.items():
        print(f"{name:18} {r['median']:7.2f} us/datagram  [{r['min']:.2f}..{r['max']:.2f}]")
    if args.save:
        write_result({**run_metadata("micro_retry"), "unit": "us per datagram, median of rounds",
                      "results": results})


if __name__ == "__main__":
    main()
