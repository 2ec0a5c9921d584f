"""Route a seeded mix of datagrams through a real Router and print a digest of the decisions.

``python -m quiclb_harness.decisions -c lb.toml --seed 7 --count 100000`` — used by
the determinism test (acceptance R-5): two processes with different
``PYTHONHASHSEED`` must print the same digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter

from lb.control.config import load_config
from lb.control.table_builder import TableBuilder
from lb.core.cid_encoder import encode_cid
from lb.core.router import Router
from quiclb_harness.datagrams import initial, short_header


def mixed_datagrams(cfg_path: str, seed: int, count: int) -> tuple[Router, list[tuple[bytes, tuple[str, int]]]]:
    cfg = load_config(cfg_path)
    svc = cfg.services[0]
    router = Router(TableBuilder().build(cfg, lambda _s, _b: True)[svc.name])
    rng = random.Random(seed)
    newest = svc.newest_cid_config()
    sids = [b.server_id for b in svc.backends] + [rng.randbytes(newest.server_id_len) for _ in range(3)]
    out = []
    for _ in range(count):
        client = (f"127.0.{rng.randrange(256)}.{rng.randrange(1, 255)}", rng.randrange(1024, 65536))
        kind = rng.randrange(4)
        if kind == 0:  # routable (or unassigned) CID in a short header
            cid = encode_cid(newest, rng.choice(sids), rng.randbytes(newest.nonce_len))
            out.append((short_header(cid, payload_len=rng.randrange(1, 60)), client))
        elif kind == 1:  # client Initial with a random DCID
            out.append((initial(1, rng.randbytes(rng.randrange(8, 21)), rng.randbytes(8)), client))
        else:  # garbage, biased towards plausible first bytes
            data = bytearray(rng.randbytes(rng.randrange(0, 80)))
            if data:
                data[0] = rng.choice([0x40, 0x41, 0x5F, 0xC0, 0xE0, 0xFF, data[0]])
            out.append((bytes(data), client))
    return router, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--count", type=int, default=100_000)
    args = ap.parse_args()
    router, datagrams = mixed_datagrams(args.config, args.seed, args.count)
    h = hashlib.sha256()
    outcomes: Counter[str] = Counter()
    for data, client in datagrams:
        outcome, backend = router.route(data, client)
        outcomes[outcome.name] += 1
        h.update(f"{outcome.value}:{backend.label if backend else '-'};".encode())
    print(json.dumps({"digest": h.hexdigest(), "outcomes": dict(sorted(outcomes.items()))}))


if __name__ == "__main__":
    main()
