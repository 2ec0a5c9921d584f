"""R-20 in memory: a backend whose handshake SCIDs do not decode to it raises stale_config; it clears."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from lb import CidConfig, encode_cid
from quiclb_harness.datagrams import initial

from .conftest import make_deployment, start_cluster, wait_for


def test_stale_config_is_raised_by_an_undecodable_handshake_scid_and_cleared_by_a_good_one(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = await start_cluster(make_deployment(tmp_path, sids=("0001",)))
        try:
            backend = cluster.backends["0001"]
            client = cluster.client()
            key = cluster.dep.key("echo", 0)
            # Config 1 is one the LB does not have: the backend got it before the LBs.
            backend.handshake_scid = encode_cid(CidConfig(1, 2, 14, key), b"\x00\x01", os.urandom(14))
            client.send(initial(1, os.urandom(8), b""), cluster.dep.vip())
            await wait_for(lambda: len(client.replies) == 1, what="the handshake reply")

            def view() -> tuple[bool, int]:
                b = next(v for v in cluster.lb.snapshot().backends if v.server_id == "0001")
                return b.stale_config, b.stale_cid_replies

            assert view() == (True, 1)
            assert cluster.lb.return_path.stats().stale_config[("echo", "0001")] is True

            backend.handshake_scid = encode_cid(CidConfig(0, 2, 14, key), b"\x00\x01", os.urandom(14))
            client.send(initial(1, os.urandom(8), b""), cluster.dep.vip())
            await wait_for(lambda: len(client.replies) == 2)
            assert view() == (False, 1)  # cleared; the count of stale replies stays (monotonic)
        finally:
            await cluster.stop()

    asyncio.run(main())
