"""The whole LB — app, datapath glue, health checker, reload, table updates — over the in-memory network.

No processes, no sockets: :class:`MemoryCluster` runs a real
:class:`lb.app.LoadBalancer` whose datapath is ``AsyncioDatapath(network.open_endpoint)``,
in-memory backends that decapsulate, record and answer (probes with Version
Negotiation, like a QUIC server), and clients bound on the same network. The
configuration is a real file written by the harness's :class:`Deployment`, so
reloads read it exactly as in production.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lb import CidConfig, encode_cid
from lb.adapters.asyncio_datapath import AsyncioDatapath
from lb.adapters.memory_network import MemoryEndpoint, MemoryNetwork
from lb.app import LoadBalancer
from lb.control.config import load_config
from lb.core.addresses import Address
from lb.core.encapsulation import decapsulate_untrusted, encode_proxy_header
from lb.core.quic_header import parse_routing_fields_untrusted
from lb.errors import MalformedDatagram
from quiclb_harness.datagrams import long_header, short_header, version_negotiation
from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec

REPLY_PREFIX = b"reply-from:"
CLIENT_HOST = "127.0.0.9"


def _is_probe(payload: bytes) -> tuple[bytes, bytes] | None:
    """(dcid, scid) of a long header with a reserved (greased) version: the LB's health probe."""
    try:
        fields = parse_routing_fields_untrusted(payload)
    except MalformedDatagram:
        return None
    if fields.version is None or fields.version & 0x0F0F0F0F != 0x0A0A0A0A:
        return None
    return fields.dcid, fields.scid or b""


@dataclass
class MemoryBackend:
    """Records decapsulated datagrams; replies through the LB; answers probes unless told not to."""

    network: MemoryNetwork
    address: Address
    server_id: str
    lb_inside: Address
    answer_probes: bool = True
    #: When set, every reply is a Handshake long header with this SCID (the R-20 stale-config check reads it).
    handshake_scid: bytes | None = None
    received: list[tuple[Address, Address, bytes]] = field(default_factory=list)
    probes: int = 0
    endpoint: MemoryEndpoint | None = None

    def __post_init__(self) -> None:
        self.endpoint = self.network.bind(self.address, self._on_datagram)

    def _on_datagram(self, data: bytes, source: Address) -> None:
        header, payload = decapsulate_untrusted(data)
        probe = _is_probe(payload)
        if probe is not None:
            self.probes += 1
            body = version_negotiation(probe[1], probe[0], [1]) if self.answer_probes else None
        else:
            self.received.append((header.source, header.destination, payload))
            if self.handshake_scid is not None:
                body = long_header(1, os.urandom(8), self.handshake_scid, packet_type=2, payload=b"hs")
            else:
                body = REPLY_PREFIX + self.server_id.encode() + b":" + payload
        if body is not None:
            assert self.endpoint is not None
            self.endpoint.sendto(encode_proxy_header(header.source, header.destination) + body, self.lb_inside)


@dataclass
class MemoryClient:
    endpoint: MemoryEndpoint
    replies: list[tuple[bytes, Address]]

    def send(self, datagram: bytes, vip: Address) -> None:
        self.endpoint.sendto(datagram, vip)


@dataclass
class MemoryCluster:
    dep: Deployment
    network: MemoryNetwork
    lb: LoadBalancer
    backends: dict[str, MemoryBackend]

    def add_backend(self, spec: BackendSpec) -> MemoryBackend:
        b = MemoryBackend(self.network, (spec.host, spec.port), spec.server_id, self.dep.inside)
        self.backends[spec.server_id] = b
        return b

    def client(self, host: str = CLIENT_HOST) -> MemoryClient:
        replies: list[tuple[bytes, Address]] = []
        endpoint = self.network.bind((host, 0), lambda data, src: replies.append((data, src)))
        return MemoryClient(endpoint, replies)

    def cid(self, sid: str, service: str = "echo", config_id: int = 0) -> bytes:
        key = self.dep.key(service, config_id)
        return encode_cid(CidConfig(config_id, 2, 14, key), bytes.fromhex(sid), os.urandom(14))

    def short(self, sid: str) -> bytes:
        return short_header(self.cid(sid))

    def fallback_sids(self, service: str = "echo") -> set[str]:
        return {sid.hex() for sid in self.lb.routers[service].table.fallback_backends}

    async def reload(self) -> bool:
        self.dep.write()
        return (await self.lb.reload()).ok

    async def stop(self) -> None:
        await self.lb.stop()


def make_deployment(tmp_path: Path, sids: tuple[str, ...] = ("0001", "0002", "0003"), **kwargs: object) -> Deployment:
    dep = Deployment(directory=tmp_path, services=[ServiceSpec(backends=[BackendSpec(s) for s in sids])],
                     admin=False, **kwargs)  # type: ignore[arg-type]
    dep.write()
    return dep


async def start_cluster(dep: Deployment, *, network: MemoryNetwork | None = None,
                        probe_sources: tuple[str, ...] = ()) -> MemoryCluster:
    network = network or MemoryNetwork()
    lb = LoadBalancer(load_config(dep.path), admin=False, datapath=AsyncioDatapath(network.open_endpoint),
                      probe_sources=probe_sources)
    cluster = MemoryCluster(dep, network, lb, {})
    for svc in dep.services:
        for spec in svc.backends:
            cluster.add_backend(spec)
    await lb.start()
    return cluster


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` holds, re-checking after every loop iteration; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.001)
