"""Backends on loopback behind the LB's own routing core: an in-process stack for backend tests.

:class:`LoopbackLb` is the load balancer's sans-IO core (:class:`~lb.core.router.Router`
and :class:`~lb.core.return_path.ReturnPath`, the very objects ``quiclb run``
drives) behind two asyncio sockets on loopback: a VIP socket for clients and an
inside socket towards the backends (design §4). Routing, the fallback hash, the
cheap rejects and the reply checks are therefore the LB's, not a look-alike;
what it leaves out is the process around them (config files, health probes,
reloads, the admin API), so backend tests need no ``quiclb`` process.

:func:`loopback_stack` starts one :class:`LoopbackLb` and one in-process
:class:`~backends.server.BackendServer` per server ID.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from backends.server import BackendServer
from backends.settings import RETURN_VIA_LB, BackendSettings
from backends.tls import TlsIdentity, generate_self_signed
from lb.core.addresses import Address, ip_version
from lb.core.cid_config import CidConfig
from lb.core.encapsulation import ProxyHeaderEncoder
from lb.core.outcomes import Outcome
from lb.core.return_path import ReturnOutcome, ReturnPath
from lb.core.router import Router
from lb.core.service_table import Backend, build_service_table

#: A fixed test key (never use outside tests).
TEST_KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")
#: The tests' default configuration: 2-byte server IDs, 17-byte CIDs, single-pass AES.
TEST_CID_CONFIG = CidConfig(config_id=0, server_id_len=2, nonce_len=14, key=TEST_KEY)
#: Fallback hash key of the loopback service (tests only).
TEST_FALLBACK_KEY = bytes.fromhex("5d1f0a3e9b7c24e86a0f13c7d2b45e91")
#: Maglev slots: prime and >= 100 per backend (up to 40 backends); small, so a
#: rebuild per added backend costs milliseconds, not the default table's tenth of a second.
LOOPBACK_MAGLEV_SIZE = 4099
SERVICE_NAME = "test"


class _Port(asyncio.DatagramProtocol):
    """One socket's callbacks: every datagram to ``on_datagram(data, (ip, port))``."""

    def __init__(self, on_datagram: Callable[[bytes, Address], None], counters: Counter[str]) -> None:
        self._on_datagram = on_datagram
        self._counters = counters

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self._counters["socket_error"] += 1


@dataclass
class LoopbackLb:
    """The LB's Router and ReturnPath for one service, on two loopback sockets (module docstring).

    ``counters`` sums the core's outcomes in the coarse terms backend tests ask
    about: ``cid_routed``, ``fallback`` and ``unroutable`` (every client datagram
    not forwarded) on the way in; ``to_client`` and ``return_rejected`` on the
    way back; ``socket_error``. The core's own counters are in
    ``router.stats()`` and ``return_path.stats()``.
    """

    cid_configs: Sequence[CidConfig] = (TEST_CID_CONFIG,)
    counters: Counter[str] = field(default_factory=Counter)
    #: (client address, server ID) of every forwarded datagram, in order (tests only; not used to
    #: route). A log, not a map: ephemeral ports are reused by later connections.
    route_log: list[tuple[Address, bytes]] = field(default_factory=list)
    vip: Address = ("", 0)
    inside: Address = ("", 0)

    def __post_init__(self) -> None:
        self._backends: dict[bytes, Address] = {}
        self._encoder = ProxyHeaderEncoder()
        self.router: Router | None = None
        self.return_path = ReturnPath()
        self._vip_transport: asyncio.DatagramTransport | None = None
        self._inside_transport: asyncio.DatagramTransport | None = None

    @property
    def backends(self) -> Mapping[bytes, Address]:
        """Server ID -> backend address, as routed now (change it with :meth:`add_backend`)."""
        return MappingProxyType(self._backends)

    async def start(self, host: str = "127.0.0.1") -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ip_version(host) == 6 else socket.AF_INET
        vip_t, _ = await loop.create_datagram_endpoint(
            lambda: _Port(self._from_client, self.counters), local_addr=(host, 0), family=family
        )
        in_t, _ = await loop.create_datagram_endpoint(
            lambda: _Port(self._from_backend, self.counters), local_addr=(host, 0), family=family
        )
        self._vip_transport, self._inside_transport = vip_t, in_t
        vip_name, inside_name = vip_t.get_extra_info("sockname"), in_t.get_extra_info("sockname")
        self.vip = (vip_name[0], vip_name[1])
        self.inside = (inside_name[0], inside_name[1])
        self._install_table()

    def add_backend(self, server_id: bytes, address: Address) -> None:
        """Route ``server_id`` to ``address`` (and trust its replies); call after :meth:`start`."""
        self._backends[server_id] = address
        self._install_table()

    def close(self) -> None:
        for transport in (self._vip_transport, self._inside_transport):
            if transport is not None:
                transport.close()

    def _install_table(self) -> None:
        # What the LB's table builder does on a reload: one immutable table, swapped whole.
        table = build_service_table(
            name=SERVICE_NAME,
            vip=self.vip,
            cid_configs=self.cid_configs,
            backends=[Backend(sid, address) for sid, address in self._backends.items()],
            fallback_key=TEST_FALLBACK_KEY,
            maglev_size=LOOPBACK_MAGLEV_SIZE,
        )
        if self.router is None:
            self.router = Router(table)
        else:
            self.router.set_table(table)
        self.return_path.reconfigure([table], own_addresses=[self.inside])

    def _from_client(self, data: bytes, client: Address) -> None:
        assert self.router is not None  # installed by start(), before the socket can deliver
        outcome, backend = self.router.route(data, client)
        if backend is None or self._inside_transport is None:
            self.counters["unroutable"] += 1
            return
        self.counters["cid_routed" if outcome is Outcome.CID_ROUTED else "fallback"] += 1
        self.route_log.append((client, backend.server_id))
        self._inside_transport.sendto(self._encoder.encapsulate(client, self.vip, data), backend.address)

    def _from_backend(self, data: bytes, source: Address) -> None:
        decision = self.return_path.handle(data, source)
        if decision.outcome is not ReturnOutcome.TO_CLIENT or decision.client is None:
            self.counters["return_rejected"] += 1
            return
        if self._vip_transport is not None:
            self.counters["to_client"] += 1
            self._vip_transport.sendto(decision.payload, decision.client)


@dataclass
class LoopbackStack:
    """The loopback LB plus in-process backends."""

    lb: LoopbackLb
    backends: list[BackendServer]
    identity: TlsIdentity

    @property
    def vip(self) -> Address:
        return self.lb.vip

    @property
    def cadata(self) -> bytes:
        """PEM trust anchor for clients (all backends share one self-signed certificate)."""
        return self.identity.certificate_pem

    def backend(self, server_id: bytes) -> BackendServer:
        return next(b for b in self.backends if b.settings.server_id == server_id)


def make_settings(
    server_id: bytes,
    lb: LoopbackLb,
    *,
    host: str,
    return_mode: str = RETURN_VIA_LB,
    cid_configs: Sequence[CidConfig] | None = None,
    lb_sources: Sequence[Address] = (),
) -> BackendSettings:
    return BackendSettings(
        server_id=server_id,
        address=(host, 0),
        vip=lb.vip,
        cid_configs=tuple(cid_configs or lb.cid_configs),
        lb_inside=lb.inside,
        lb_sources=tuple(lb_sources),
        return_mode=return_mode,
        service=SERVICE_NAME,
    )


@asynccontextmanager
async def loopback_stack(
    server_ids: Sequence[bytes] = (b"\x00\x01",),
    *,
    host: str = "127.0.0.1",
    cid_configs: Sequence[CidConfig] = (TEST_CID_CONFIG,),
    return_mode: str = RETURN_VIA_LB,
    idle_timeout: float = 30.0,
    max_cids: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> AsyncIterator[LoopbackStack]:
    """Start a loopback LB and one in-process backend per server ID; close everything on exit."""
    lb = LoopbackLb(cid_configs=tuple(cid_configs))
    await lb.start(host)
    identity = generate_self_signed()
    backends: list[BackendServer] = []
    try:
        for sid in server_ids:
            settings = make_settings(sid, lb, host=host, return_mode=return_mode, **(options or {}))
            backend = BackendServer(settings, identity=identity, idle_timeout=idle_timeout, max_cids=max_cids)
            await backend.start()
            lb.add_backend(sid, backend.address)
            backends.append(backend)
        yield LoopbackStack(lb, backends, identity)
    finally:
        for backend in backends:
            backend.close()
        lb.close()
