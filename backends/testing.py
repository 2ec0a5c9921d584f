"""Loopback test tools: a tiny stand-in load balancer and an in-process backend stack.

:class:`FakeLbRelay` speaks the LB's side of design §4 without being the LB:
a VIP socket takes client datagrams, routes them by decoding the DCID with
the service's cid_configs (a long header whose DCID does not decode to a
known backend goes to a hash of the client address; a short header that does
not is dropped and counted), wraps them in PROXY v2 (source = client,
destination = VIP) and sends them from its inside socket. Replies that arrive
on the inside socket from a backend are unwrapped and sent from the VIP
socket to the client the header names. It keeps no per-client state.

It exists so that backend tests do not depend on the real LB; it is not a
reference for it (no cheap rejects, no Maglev, no health checks).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from backends.server import BackendServer
from backends.settings import RETURN_VIA_LB, Address, BackendSettings, canonical_ip
from backends.tls import TlsIdentity, generate_self_signed
from lb.core.cid_config import CidConfig
from lb.core.cid_decoder import decode_server_id
from lb.core.encapsulation import ProxyHeaderEncoder, decapsulate_untrusted
from lb.errors import MalformedDatagram

#: A fixed test key (never use outside tests).
TEST_KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")
#: The tests' default configuration: 2-byte server IDs, 17-byte CIDs, single-pass AES.
TEST_CID_CONFIG = CidConfig(config_id=0, server_id_len=2, nonce_len=14, key=TEST_KEY)


def _dcid_of(datagram: bytes, short_cid_len: int) -> tuple[bytes, bool] | None:
    """(DCID, is_long_header) of the first packet, or None when too short to tell."""
    if not datagram:
        return None
    if datagram[0] & 0x80:
        if len(datagram) < 6 or len(datagram) < 6 + datagram[5]:
            return None
        return datagram[6 : 6 + datagram[5]], True
    if len(datagram) < 1 + short_cid_len:
        return None
    return datagram[1 : 1 + short_cid_len], False


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, relay: FakeLbRelay, inside: bool) -> None:
        self._relay = relay
        self._inside = inside

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self._inside:
            self._relay._from_backend(data, (addr[0], addr[1]))
        else:
            self._relay._from_client(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self._relay.counters["socket_error"] += 1


@dataclass
class FakeLbRelay:
    """A stateless loopback relay between clients and backends (see the module docstring)."""

    cid_configs: Sequence[CidConfig] = (TEST_CID_CONFIG,)
    #: Server ID -> backend address; fill in after the backends have bound.
    backends: dict[bytes, Address] = field(default_factory=dict)
    #: Outcome counters: ``cid_routed``, ``fallback``, ``unroutable``, ``to_client``,
    #: ``return_rejected``, ``return_malformed``.
    counters: Counter[str] = field(default_factory=Counter)
    #: Client address -> server IDs its datagrams were routed to (tests only; not used to route).
    routed: dict[Address, set[bytes]] = field(default_factory=dict)
    vip: Address = ("", 0)
    inside: Address = ("", 0)

    def __post_init__(self) -> None:
        self._encoder = ProxyHeaderEncoder()
        self._vip_transport: asyncio.DatagramTransport | None = None
        self._inside_transport: asyncio.DatagramTransport | None = None
        self._short_cid_len = self.cid_configs[-1].cid_len

    async def start(self, host: str = "127.0.0.1") -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        vip_t, _ = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self, False), local_addr=(host, 0), family=family
        )
        in_t, _ = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self, True), local_addr=(host, 0), family=family
        )
        self._vip_transport, self._inside_transport = vip_t, in_t
        vip_name, inside_name = vip_t.get_extra_info("sockname"), in_t.get_extra_info("sockname")
        self.vip = (vip_name[0], vip_name[1])
        self.inside = (inside_name[0], inside_name[1])

    def close(self) -> None:
        for transport in (self._vip_transport, self._inside_transport):
            if transport is not None:
                transport.close()

    def _pick(self, datagram: bytes, client: Address) -> bytes | None:
        parsed = _dcid_of(datagram, self._short_cid_len)
        if parsed is None:
            return None
        dcid, is_long = parsed
        sid = decode_server_id(self.cid_configs, dcid)
        if sid is not None and sid in self.backends:
            self.counters["cid_routed"] += 1
            return sid
        if not is_long or not self.backends:
            return None
        self.counters["fallback"] += 1
        ids = sorted(self.backends)
        digest = hashlib.blake2b(f"{client[0]}|{client[1]}".encode(), digest_size=8).digest()
        return ids[int.from_bytes(digest, "big") % len(ids)]

    def _from_client(self, data: bytes, client: Address) -> None:
        sid = self._pick(data, client)
        if sid is None or self._inside_transport is None:
            self.counters["unroutable"] += 1
            return
        self.routed.setdefault(client, set()).add(sid)
        packet = self._encoder.encapsulate(client, self.vip, data)
        self._inside_transport.sendto(packet, self.backends[sid])

    def _from_backend(self, data: bytes, source: Address) -> None:
        if (canonical_ip(source[0]), source[1]) not in {(canonical_ip(h), p) for h, p in self.backends.values()}:
            self.counters["return_rejected"] += 1
            return
        try:
            header, payload = decapsulate_untrusted(data)
        except MalformedDatagram:
            self.counters["return_malformed"] += 1
            return
        if self._vip_transport is not None:
            self.counters["to_client"] += 1
            self._vip_transport.sendto(payload, header.source)


@dataclass
class LoopbackStack:
    """A relay plus in-process backends, all on loopback."""

    relay: FakeLbRelay
    backends: list[BackendServer]
    identity: TlsIdentity

    @property
    def vip(self) -> Address:
        return self.relay.vip

    @property
    def cadata(self) -> bytes:
        """PEM trust anchor for clients (all backends share one self-signed certificate)."""
        return self.identity.certificate_pem

    def backend(self, server_id: bytes) -> BackendServer:
        return next(b for b in self.backends if b.settings.server_id == server_id)


def make_settings(
    server_id: bytes,
    relay: FakeLbRelay,
    *,
    host: str,
    return_mode: str = RETURN_VIA_LB,
    cid_configs: Sequence[CidConfig] | None = None,
    lb_sources: Sequence[Address] = (),
) -> BackendSettings:
    return BackendSettings(
        server_id=server_id,
        address=(host, 0),
        vip=relay.vip,
        cid_configs=tuple(cid_configs or relay.cid_configs),
        lb_inside=relay.inside,
        lb_sources=tuple(lb_sources),
        return_mode=return_mode,
        service="test",
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
    """Start a relay and one in-process backend per server ID; close everything on exit."""
    relay = FakeLbRelay(cid_configs=tuple(cid_configs))
    await relay.start(host)
    identity = generate_self_signed()
    backends: list[BackendServer] = []
    try:
        for sid in server_ids:
            settings = make_settings(sid, relay, host=host, return_mode=return_mode, **(options or {}))
            backend = BackendServer(settings, identity=identity, idle_timeout=idle_timeout, max_cids=max_cids)
            await backend.start()
            relay.backends[sid] = backend.address
            backends.append(backend)
        yield LoopbackStack(relay, backends, identity)
    finally:
        for backend in backends:
            backend.close()
        relay.close()
