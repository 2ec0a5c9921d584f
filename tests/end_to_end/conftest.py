"""Fixtures for loopback end-to-end tests: deployments, LB processes, plain UDP test backends."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec
from quiclb_harness.processes import ManagedProcess, start_lb
from quiclb_harness.quic_cluster import QuicCluster
from quiclb_harness.udp_backend import UdpTestBackend


@dataclass
class UdpCluster:
    dep: Deployment
    io: str = "asyncio"
    backends: dict[str, UdpTestBackend] = field(default_factory=dict)
    lbs: list[ManagedProcess] = field(default_factory=list)

    def start_backend(self, spec: BackendSpec) -> UdpTestBackend:
        b = UdpTestBackend((spec.host, spec.port), spec.server_id, self.dep.inside)
        self.backends[spec.server_id] = b
        return b

    def start_lb(self, *extra: str, env: dict[str, str] | None = None) -> ManagedProcess:
        p = start_lb(self.dep.path, "--io", self.io, *extra, env=env)
        self.lbs.append(p)
        return p

    def admin(self, lb: ManagedProcess) -> tuple[str, int]:
        host, port = lb.wait_ready()["admin"].rsplit(":", 1)
        return host, int(port)

    def close(self) -> None:
        for p in self.lbs:
            p.kill()
        for b in self.backends.values():
            b.close()


def make_udp_cluster(tmp_path: Path, host: str = "127.0.0.1", n: int = 3, io: str = "asyncio") -> UdpCluster:
    spec = ServiceSpec(vip_host=host, backends=[BackendSpec(f"{i:04x}", host=host) for i in range(1, n + 1)])
    dep = Deployment(tmp_path, [spec], inside_host=host)
    dep.write()
    cluster = UdpCluster(dep, io)
    for b in spec.backends:
        cluster.start_backend(b)
    return cluster


@pytest.fixture(params=["asyncio", "batched"])
def udp_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[UdpCluster]:
    """A cluster whose LB runs on asyncio endpoints or on recvmmsg/sendmmsg batches (``--io``)."""
    cluster = make_udp_cluster(tmp_path, io=request.param)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def quic_cluster(tmp_path: Path) -> Iterator[QuicCluster]:
    """An LB and three aioquic backends (0001..0003) on loopback, stopped after the test."""
    c = QuicCluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.close()

