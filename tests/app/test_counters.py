"""Every client datagram a VIP port receives ends in exactly one counted outcome, adapters included."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

from lb.core.outcomes import Outcome
from quiclb_harness.datagrams import initial, long_header, short_header, version_negotiation

from .conftest import make_deployment, start_cluster


def test_received_client_datagrams_equal_router_outcomes_plus_adapter_drops(tmp_path: Path) -> None:
    rng = random.Random(7)

    async def main() -> None:
        cluster = await start_cluster(make_deployment(tmp_path))
        try:
            vip = cluster.dep.vip()
            client = cluster.client()
            mix = [
                lambda: cluster.short(rng.choice(["0001", "0002", "0003"])),  # CID routed
                lambda: cluster.short("0009"),  # unknown server ID: dropped
                lambda: initial(1, os.urandom(8), os.urandom(8)),  # fallback
                lambda: initial(0x1A2A3A4A, os.urandom(8), b""),  # full-size unknown version: fallback
                lambda: long_header(0x5A5A5A5A, os.urandom(8), b"", pad_to=100),  # small unknown version
                lambda: version_negotiation(os.urandom(8), os.urandom(8), [1]),
                lambda: short_header(b"\xff" * 17),  # config bits 0b111
                lambda: os.urandom(rng.randrange(0, 60)),  # garbage, empty included
                lambda: b"",
            ]
            sent = 0
            for _ in range(500):
                client.send(rng.choice(mix)(), vip)
                sent += 1
            await cluster.network.settle()
            snap = cluster.lb.snapshot()
            assert snap.datapath is not None
            outcomes = sum(r.total_outcomes() for r in snap.routers)
            drops = sum(snap.datapath.drops.values())
            assert snap.datapath.rx_client_datagrams == sent
            assert snap.datapath.rx_client_datagrams == outcomes + drops
            forwarded = sum(n for r in snap.routers for o, n in r.outcomes.items() if o.forwards)
            assert forwarded == sum(snap.datapath.tx_to_backend.values()) + sum(
                snap.datapath.backend_unreachable.values()
            )
            assert snap.routers[0].outcomes[Outcome.MALFORMED_DROPPED] > 0
        finally:
            await cluster.stop()

    asyncio.run(main())
