"""Tables built off the event loop are the tables a synchronous build gives, and only changed rings are built."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from pathlib import Path

from lb.control.config import load_config
from lb.control.ring_worker import ring_executor
from lb.control.table_builder import TableBuilder, build_tables, same_routing
from lb.core.service_table import Backend, build_service_table
from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec


def _deployment(tmp_path: Path) -> Deployment:
    dep = Deployment(directory=tmp_path, admin=False, services=[
        ServiceSpec(name=f"svc{i}", backends=[BackendSpec(f"{j:04x}") for j in range(1, 5)]) for i in range(3)
    ])
    dep.write()
    return dep


def test_a_build_in_a_process_pool_equals_the_synchronous_build(tmp_path: Path) -> None:
    cfg = load_config(_deployment(tmp_path).path)
    unhealthy = frozenset({("svc1", b"\x00\x02")})

    async def main() -> None:
        builder = TableBuilder(workers=ring_executor)
        try:
            off_loop = await builder.build_async(cfg, unhealthy, now=0.0)
        finally:
            assert builder.executor is not None
            builder.executor.shutdown()
        # The reference: the core's own one-shot build, no ring memory, no executor.
        inline = {
            svc.name: build_service_table(
                name=svc.name, vip=svc.vip, cid_configs=svc.cid_configs, fallback_key=svc.fallback_key,
                maglev_size=cfg.lb.maglev_size,
                backends=[Backend(b.server_id, b.address, healthy=(svc.name, b.server_id) not in unhealthy)
                          for b in svc.backends],
            )
            for svc in cfg.services
        }
        assert off_loop.keys() == inline.keys()
        for name, table in off_loop.items():
            assert table.maglev == inline[name].maglev  # names, key, size and every slot
            assert table.maglev.slots.tobytes() == inline[name].maglev.slots.tobytes()
            assert dict(table.backends) == dict(inline[name].backends)
        assert b"\x00\x02" not in off_loop["svc1"].fallback_backends

    asyncio.run(main())


def test_only_rings_whose_inputs_changed_are_built(tmp_path: Path) -> None:
    cfg = load_config(_deployment(tmp_path).path)
    builder = TableBuilder()
    first = builder.build_now(cfg, frozenset(), now=0.0)
    assert builder.stats().fallback_table_builds == 3
    flapped = builder.build_now(cfg, frozenset({("svc0", b"\x00\x01")}), now=0.0)
    assert builder.stats().fallback_table_builds == 4  # svc0 only
    assert same_routing(first["svc1"], flapped["svc1"]) and not same_routing(first["svc0"], flapped["svc0"])
    back = builder.build_now(cfg, frozenset(), now=0.0)
    assert builder.stats().fallback_table_builds == 4  # the healthy ring was kept
    assert back["svc0"].maglev is first["svc0"].maglev


def test_a_flap_reassembles_only_its_own_service_and_equals_the_pure_build(tmp_path: Path) -> None:
    """Issue 13 item 3: each table costs the event loop 0.1-0.3 ms, so the others are reused as they are."""
    cfg = load_config(_deployment(tmp_path).path)
    stones = {"svc2": {b"\x00\x09": (110.0, ("127.0.0.1", 9))}}
    builder = TableBuilder()
    builder.set_tombstones(stones)
    first = builder.build_now(cfg, frozenset(), now=100.0)
    down = frozenset({("svc0", b"\x00\x01")})
    flapped = builder.build_now(cfg, down, now=100.0)
    assert flapped["svc1"] is first["svc1"] and flapped["svc2"] is first["svc2"]
    assert flapped["svc0"] is not first["svc0"]
    later = builder.build_now(cfg, down, now=110.0)  # svc2's tombstone has expired: svc2 only
    assert later["svc0"] is flapped["svc0"] and later["svc2"] is not flapped["svc2"]
    for got, now, unhealthy in ((flapped, 100.0, down), (later, 110.0, down)):
        pure = build_tables(cfg, unhealthy, stones, now)
        for name, table in got.items():  # rings are fresh objects in the pure build: compare by value
            assert table.maglev == pure[name].maglev and dict(table.backends) == dict(pure[name].backends)
            assert table.tombstones == pure[name].tombstones


def test_tombstones_expire_by_now_without_a_ring_build(tmp_path: Path) -> None:
    dep = _deployment(tmp_path)
    old = load_config(dep.path)
    dep.services[0].backends.pop()
    dep.write()
    new = load_config(dep.path)
    builder = TableBuilder(tombstone_seconds=10.0)
    builder.build_now(old, frozenset(), now=0.0)
    builder.note_reload(old, new, now=100.0)
    tables = builder.build_now(new, frozenset(), now=105.0)
    assert tables["svc0"].tombstones == {b"\x00\x04"}
    builds = builder.stats().fallback_table_builds
    assert builder.expire(110.0)
    later = builder.build_now(new, frozenset(), now=110.0)
    assert later["svc0"].tombstones == frozenset()
    assert builder.stats().fallback_table_builds == builds


def test_the_pure_build_drops_tombstones_whose_time_has_come(tmp_path: Path) -> None:
    cfg = load_config(_deployment(tmp_path).path)
    stones = {"svc0": {b"\x00\x09": (110.0, ("127.0.0.1", 9))}}
    assert build_tables(cfg, frozenset(), stones, now=105.0)["svc0"].tombstones == {b"\x00\x09"}
    assert build_tables(cfg, frozenset(), stones, now=110.0)["svc0"].tombstones == frozenset()


def test_a_dead_ring_worker_is_replaced_and_the_build_still_happens(tmp_path: Path) -> None:
    cfg = load_config(_deployment(tmp_path).path)

    async def main() -> None:
        builder = TableBuilder(workers=ring_executor)
        try:
            await builder.build_async(cfg, frozenset(), now=0.0)
            workers = multiprocessing.active_children()
            assert workers
            for worker in workers:  # the OOM killer, say
                os.kill(worker.pid or 0, signal.SIGKILL)
                worker.join(5)
            flapped = await builder.build_async(cfg, frozenset({("svc2", b"\x00\x01")}), now=0.0)
            assert b"\x00\x01" not in flapped["svc2"].fallback_backends
            assert builder.stats().worker_restarts == 1
        finally:
            assert builder.executor is not None
            builder.executor.shutdown()

    asyncio.run(main())
