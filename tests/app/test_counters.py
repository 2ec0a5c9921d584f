"""Every client datagram a VIP port receives ends in exactly one counted outcome, adapters included."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

from lb.adapters.memory_network import Packet
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


def test_the_sum_holds_over_a_network_that_drops_duplicates_and_delays(tmp_path: Path) -> None:
    rng = random.Random(11)

    async def main() -> None:
        cluster = await start_cluster(make_deployment(tmp_path))
        net = cluster.network
        vip = cluster.dep.vip()
        reached_vip = 0

        def terrible(packet: Packet) -> None:
            nonlocal reached_vip
            fate = rng.random()
            copies = 0 if fate < 0.1 else 2 if fate < 0.2 else 1
            if packet.destination == vip:
                reached_vip += copies
            for _ in range(copies):
                if rng.random() < 0.3:
                    net.deliver_later(packet, rng.random() * 0.01)
                else:
                    net.deliver(packet)

        net.route_packet = terrible
        try:
            client = cluster.client()
            for _ in range(300):
                sid = rng.choice(["0001", "0002", "0003"])
                client.send(cluster.short(sid) if rng.random() < 0.7 else initial(1, os.urandom(8), b""), vip)
            await net.settle()
            snap = cluster.lb.snapshot()
            assert snap.datapath is not None
            assert snap.datapath.rx_client_datagrams == reached_vip
            assert reached_vip == sum(r.total_outcomes() for r in snap.routers) + sum(snap.datapath.drops.values())
            # Every forward was sent or counted as refused; every accepted reply was sent or counted.
            forwarded = sum(n for r in snap.routers for o, n in r.outcomes.items() if o.forwards)
            assert forwarded == sum(snap.datapath.tx_to_backend.values()) + sum(
                snap.datapath.backend_unreachable.values()
            )
            assert snap.return_path.tx_to_client == snap.datapath.tx_to_client + snap.datapath.tx_to_client_errors
        finally:
            await cluster.stop()

    asyncio.run(main())
