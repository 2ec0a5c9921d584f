"""The reload transaction, in memory: swaps whole, or keeps the running configuration and says why."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from lb.control.config import LbConfig, load_config
from lb.control.reload import ConfigReloader
from lb.errors import ConfigError
from quiclb_harness.deployment import BackendSpec

from .conftest import REPLY_PREFIX, make_deployment, start_cluster, wait_for


def test_a_valid_reload_swaps_the_configuration_and_routes_to_the_new_backend(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = await start_cluster(make_deployment(tmp_path))
        try:
            spec = BackendSpec("0004", port=0)
            cluster.dep.services[0].backends.append(spec)
            cluster.dep.version = 2
            cluster.dep.write()
            new_backend = cluster.add_backend(spec)
            result = await cluster.lb.reload()
            assert result.ok, result.message
            assert result.config_version == 2 and cluster.lb.config.version == 2
            assert "0004" in cluster.fallback_sids()
            client = cluster.client()
            client.send(cluster.short("0004"), cluster.dep.vip())
            await wait_for(lambda: len(client.replies) == 1, what="the reply of the new backend")
            assert client.replies[0][0].startswith(REPLY_PREFIX + b"0004:")
            assert len(new_backend.received) == 1
            snap = cluster.lb.snapshot()
            assert (snap.config_reloads, snap.config_rejected, snap.last_reload_error) == (1, 0, None)
        finally:
            await cluster.stop()

    asyncio.run(main())


def test_an_invalid_file_keeps_the_running_configuration_and_counts_the_rejection(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = await start_cluster(make_deployment(tmp_path))
        try:
            before = cluster.lb.config
            cluster.dep.path.write_text(cluster.dep.path.read_text().replace("nonce_len = 14", "nonce_len = 99"))
            result = await cluster.lb.reload()
            assert not result.ok
            assert "nonce_len" in result.message
            assert cluster.lb.config is before
            assert (result.config_version, result.config_digest) == (before.version, before.digest)
            snap = cluster.lb.snapshot()
            assert snap.config_rejected == 1 and snap.config_reloads == 0
            assert snap.last_reload_error == result.message
            client = cluster.client()
            client.send(cluster.short("0002"), cluster.dep.vip())  # still routing with the old tables
            await wait_for(lambda: len(client.replies) == 1)
            assert client.replies[0][0].startswith(REPLY_PREFIX + b"0002:")
        finally:
            await cluster.stop()

    asyncio.run(main())


def test_a_hostile_deeply_nested_file_is_a_rejected_reload_in_one_line(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = await start_cluster(make_deployment(tmp_path))
        try:
            cluster.dep.path.write_text("x = " + "[" * 10_000 + "]" * 10_000 + "\n")
            result = await cluster.lb.reload()
            assert not result.ok
            assert "\n" not in result.message and len(result.message) <= 500
            assert cluster.lb.snapshot().config_rejected == 1
        finally:
            await cluster.stop()

    asyncio.run(main())


def test_changing_a_restart_only_setting_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = await start_cluster(make_deployment(tmp_path))
        try:
            cluster.dep.inside_port += 1
            result_ok = await cluster.reload()
            assert not result_ok
            assert "lb.inside" in (cluster.lb.snapshot().last_reload_error or "")
            assert "needs a restart" in (cluster.lb.snapshot().last_reload_error or "")
        finally:
            await cluster.stop()

    asyncio.run(main())


# -- the transaction alone, with a scripted target ------------------------------------


class _Target:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.prepared = 0
        self.committed: list[LbConfig] = []

    async def prepare(self, old: LbConfig, new: LbConfig) -> Callable[[], None]:
        self.prepared += 1
        if self.fail is not None:
            raise self.fail
        return lambda: self.committed.append(new)


def _raiser(exc: BaseException) -> Callable[[Path], LbConfig]:
    def load(path: Path) -> LbConfig:
        raise exc

    return load


@pytest.mark.parametrize(
    "exc",
    [RecursionError("maximum recursion depth exceeded"), MemoryError(), KeyError("x"), ConfigError("bad: line\nbreak")],
    ids=["recursion", "memory", "keyerror", "configerror"],
)
def test_any_exception_while_loading_is_a_rejected_reload(tmp_path: Path, exc: BaseException) -> None:
    cfg = load_config(make_deployment(tmp_path).path)

    async def main() -> None:
        target = _Target()
        reloader = ConfigReloader(cfg, target, load=_raiser(exc))
        reloader.mark_started()
        result = await reloader.reload()
        assert not result.ok and result.message and "\n" not in result.message
        assert reloader.stats().rejected == 1 and reloader.stats().last_reload_error == result.message
        assert reloader.config is cfg and target.prepared == 0

    asyncio.run(main())


def test_a_failing_prepare_is_a_rejected_reload_and_commits_nothing(tmp_path: Path) -> None:
    cfg = load_config(make_deployment(tmp_path).path)

    async def main() -> None:
        target = _Target(fail=OSError(98, "Address already in use"))
        reloader = ConfigReloader(cfg, target)
        reloader.mark_started()
        result = await reloader.reload()
        assert not result.ok and "Address already in use" in result.message
        assert target.committed == [] and reloader.config is cfg

    asyncio.run(main())


def test_a_reload_requested_during_start_is_applied_right_after_it(tmp_path: Path) -> None:
    cfg = load_config(make_deployment(tmp_path).path)

    async def main() -> None:
        target = _Target()
        reloader = ConfigReloader(cfg, target)
        task = reloader.request()  # SIGHUP while the LB is still starting
        for _ in range(10):
            await asyncio.sleep(0)
        assert target.prepared == 0 and not task.done()
        reloader.mark_started()
        result = await task
        assert result.ok and len(target.committed) == 1 and reloader.stats().reloads == 1

    asyncio.run(main())


def test_a_sighup_reload_that_fails_leaves_no_unretrieved_task_exception(tmp_path: Path) -> None:
    cfg = load_config(make_deployment(tmp_path).path)
    loop_errors: list[dict[str, object]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
        reloader = ConfigReloader(cfg, _Target(), load=_raiser(RecursionError()))
        reloader.mark_started()
        task = reloader.request()
        await asyncio.wait([task])
        assert task.result().ok is False
        assert reloader.stats().rejected == 1

    asyncio.run(main())
    assert loop_errors == []


def test_sighup_before_start_through_the_app_does_not_kill_it(tmp_path: Path) -> None:
    async def main() -> None:
        from lb.adapters.asyncio_datapath import AsyncioDatapath  # noqa: PLC0415
        from lb.adapters.memory_network import MemoryNetwork  # noqa: PLC0415
        from lb.app import LoadBalancer  # noqa: PLC0415

        dep = make_deployment(tmp_path)
        network = MemoryNetwork()
        lb = LoadBalancer(load_config(dep.path), admin=False, datapath=AsyncioDatapath(network.open_endpoint))
        task = lb.reloader.request()  # what the SIGHUP handler calls, installed before start
        await lb.start()
        try:
            result = await task
            assert result.ok and lb.snapshot().config_reloads == 1
        finally:
            await lb.stop()

    asyncio.run(main())


def test_post_reload_answers_422_for_a_hostile_file_and_the_metrics_say_so(tmp_path: Path) -> None:
    from lb.adapters.asyncio_datapath import AsyncioDatapath  # noqa: PLC0415
    from lb.adapters.memory_network import MemoryNetwork  # noqa: PLC0415
    from lb.app import LoadBalancer  # noqa: PLC0415
    from quiclb_harness.admin_client import admin_request, metric_sum, scrape  # noqa: PLC0415
    from quiclb_harness.deployment import Deployment, ServiceSpec  # noqa: PLC0415

    dep = Deployment(directory=tmp_path, services=[ServiceSpec(backends=[BackendSpec("0001")])])
    dep.write()

    async def main() -> None:
        lb = LoadBalancer(load_config(dep.path), datapath=AsyncioDatapath(MemoryNetwork().open_endpoint))
        await lb.start()
        try:
            assert lb.admin_address is not None
            dep.path.write_text("x = " + "[" * 10_000 + "]" * 10_000 + "\n")
            loop = asyncio.get_running_loop()
            status, body = await loop.run_in_executor(
                None, admin_request, lb.admin_address, "POST", "/reload", dep.token
            )
            assert status == 422, body
            samples = await loop.run_in_executor(None, scrape, lb.admin_address, dep.token)
            assert metric_sum(samples, "quiclb_config_rejected_total") == 1
            assert metric_sum(samples, "quiclb_config_last_reload_failed") == 1
        finally:
            await lb.stop()

    asyncio.run(main())
