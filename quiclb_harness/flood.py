"""A paced UDP flood of random QUIC short headers, run as its own process (D-0, D-1, D-6).

    python -m quiclb_harness.flood --target 127.0.0.1:4433 --rate 20000 --seconds 10 \\
        [--flows 64 | --flows 1] [--seed 1] [--size-min 40 --size-max 1200] [--config-id 0]

Every datagram is a short header (fixed bit set) with random bytes after it: a
DCID that decodes to no backend, so the LB decodes it (one AES call) and drops
it. ``--flows`` source sockets take turns (1 = one hot 5-tuple). Sending is
paced in 1 ms ticks with plain ``sendto``; one Python process reaches a few
hundred thousand datagrams/s on loopback, more than the Python LB forwards.
A separate process, so the generator never competes with the test's own
event loop for the GIL. Bounded by ``--seconds`` and ``--rate x --seconds``
datagrams; prints one JSON line: ``{"sent", "errors", "seconds"}``. Only
loopback targets are accepted (acceptance ground rules).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import socket
import sys
import time
from collections.abc import Sequence

TICK = 0.001
#: Distinct datagrams cycled through (random enough for the LB, cheap to build).
POOL = 4096


def make_pool(rng: random.Random, size_min: int, size_max: int, config_id: int | None = None) -> list[bytes]:
    """Short headers: first octet 0b01xxxxxx, then random bytes. With ``config_id`` the DCID's
    first octet names that configuration (-21 §3), so the LB must run its decoder on every one
    instead of dropping 7 in 8 for an unknown config: the expensive kind of garbage."""
    pool = []
    for _ in range(POOL):
        body = bytearray(rng.randbytes(rng.randint(max(size_min, 2), size_max) - 1))
        if config_id is not None:
            body[0] = (config_id << 5) | (body[0] & 0x1F)
        pool.append(bytes([0x40 | rng.getrandbits(6)]) + bytes(body))
    return pool


def flood(target: tuple[str, int], rate: float, seconds: float, flows: int, pool: Sequence[bytes]) -> dict[str, float]:
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    socks = []
    for _ in range(flows):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((target[0], 0))
        s.setblocking(False)
        socks.append(s)
    sent = errors = 0
    limit = int(rate * seconds)
    start = time.monotonic()
    end = start + seconds
    k = 0
    try:
        while sent + errors < limit:
            now = time.monotonic()
            if now >= end:
                break
            due = min(limit, int((now - start + TICK) * rate)) - (sent + errors)
            for _ in range(due):
                try:
                    socks[k % flows].sendto(pool[k % POOL], target)
                    sent += 1
                except (BlockingIOError, ConnectionRefusedError):
                    errors += 1
                k += 1
            ahead = start + (sent + errors) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(min(ahead, TICK))
    finally:
        for s in socks:
            s.close()
    return {"sent": sent, "errors": errors, "seconds": time.monotonic() - start}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quiclb_harness.flood")
    p.add_argument("--target", required=True, help="HOST:PORT on loopback")
    p.add_argument("--rate", type=float, required=True, help="datagrams per second")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--flows", type=int, default=64, help="source sockets (1 = one hot 5-tuple)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size-min", type=int, default=40)
    p.add_argument("--size-max", type=int, default=1200)
    p.add_argument("--nice", type=int, default=0, help="lower the generator's CPU priority by this much")
    p.add_argument("--config-id", type=int, choices=range(7), help="DCID config bits (default: random)")
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    host = host.strip("[]")
    if not ipaddress.ip_address(host).is_loopback:
        p.error("--target must be a loopback address")
    if args.rate <= 0 or args.seconds <= 0 or args.flows < 1:
        p.error("--rate and --seconds must be > 0, --flows >= 1")
    if args.nice > 0:
        # On a small machine the generator shares cores with the LB, the backends and the
        # clients: it should yield to them rather than add scheduling delay to their latencies.
        os.nice(args.nice)
    pool = make_pool(random.Random(args.seed), args.size_min, args.size_max, args.config_id)
    result = flood((host, int(port)), args.rate, args.seconds, args.flows, pool)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
