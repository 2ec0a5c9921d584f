"""Issue 13 hole 2, in memory: a CID key rotation never moves the fallback (handshakes in flight).

A rotation adds a ``cid_config`` (reload), later removes the old one (reload).
The Initials of a handshake keep arriving across those reloads, so the keyed
Maglev fallback must send the same 4-tuple to the same backend before, during
and after: the fallback key may not depend on the set of CID keys. Run with
the deployment's ``fallback_key_file`` and with the public derived key.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from quiclb_harness.datagrams import initial
from quiclb_harness.deployment import CidConfigSpec

from .conftest import CLIENT_HOST, MemoryCluster, make_deployment, start_cluster, wait_for

CLIENT_PORTS = range(40000, 40300)  # 300 4-tuples: 3 backends, each gets ~100


async def _backend_of_each_port(cluster: MemoryCluster, dcids: dict[int, bytes]) -> dict[int, str]:
    """Send one 8-byte-DCID Initial (like aioquic's) from each client port; who received it?"""
    for b in cluster.backends.values():
        b.received.clear()
    for port, dcid in dcids.items():
        endpoint = cluster.network.bind((CLIENT_HOST, port), lambda data, src: None)
        endpoint.sendto(initial(1, dcid, b"\x01" * 8), cluster.dep.vip())
        endpoint.close()
    await wait_for(lambda: sum(len(b.received) for b in cluster.backends.values()) == len(dcids),
                   what="every Initial at a backend")
    seen: dict[int, str] = {}
    for sid, b in cluster.backends.items():
        for client, _vip, _payload in b.received:
            assert client[0] == CLIENT_HOST  # the PROXY header carries the real client address
            seen[client[1]] = sid
    return seen


@pytest.mark.parametrize("fallback_key_file", [True, False], ids=["fallback_key_file", "derived-key"])
def test_initials_keep_their_backend_while_a_cid_config_is_added_then_removed(
    tmp_path: Path, fallback_key_file: bool
) -> None:
    rng = random.Random(13)
    dcids = {port: rng.randbytes(8) for port in CLIENT_PORTS}

    async def main() -> None:
        cluster = await start_cluster(make_deployment(tmp_path, fallback_key=fallback_key_file))
        try:
            before = await _backend_of_each_port(cluster, dcids)
            assert set(before.values()) == {"0001", "0002", "0003"}  # the keyed hash spreads them
            key0 = cluster.lb.config.services[0].fallback_key

            svc = cluster.dep.services[0]
            svc.cid_configs.append(CidConfigSpec(config_id=1))  # rotation step 1: a new key, to the LBs
            cluster.dep.version += 1
            assert await cluster.reload()
            assert [c.config_id for c in cluster.lb.config.services[0].cid_configs] == [0, 1]
            assert await _backend_of_each_port(cluster, dcids) == before

            del svc.cid_configs[0]  # rotation step 3: the old configuration goes
            cluster.dep.version += 1
            assert await cluster.reload()
            assert [c.config_id for c in cluster.lb.config.services[0].cid_configs] == [1]
            assert await _backend_of_each_port(cluster, dcids) == before
            assert cluster.lb.config.services[0].fallback_key == key0
        finally:
            await cluster.stop()

    asyncio.run(main())


def test_the_fallback_key_file_is_what_places_initials(tmp_path: Path) -> None:
    """The control for the test above: a different fallback key does move Initials (the test can see a move)."""
    rng = random.Random(14)
    dcids = {port: rng.randbytes(8) for port in CLIENT_PORTS}

    async def main() -> None:
        cluster = await start_cluster(make_deployment(tmp_path))
        try:
            before = await _backend_of_each_port(cluster, dcids)
            (cluster.dep.directory / "fallback.key").unlink()
            cluster.dep.version += 1
            assert await cluster.reload()  # rewrites fallback.key with a fresh key
            after = await _backend_of_each_port(cluster, dcids)
            moved = sum(before[p] != after[p] for p in before)
            assert moved > len(before) / 3  # a new key reshuffles about 2/3 of them with 3 backends
        finally:
            await cluster.stop()

    asyncio.run(main())


@pytest.mark.parametrize("fallback_key_file", [True, False], ids=["fallback_key_file", "derived-key"])
def test_a_public_fallback_key_is_logged_at_start(
    tmp_path: Path, fallback_key_file: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        cluster = await start_cluster(make_deployment(tmp_path, fallback_key=fallback_key_file))
        await cluster.stop()

    with caplog.at_level("WARNING", logger="quiclb"):
        asyncio.run(main())
    assert any("no lb.fallback_key_file" in r.getMessage() for r in caplog.records) is not fallback_key_file
