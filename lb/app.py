"""The composition root: configuration, tables, routers, sockets and admin wired together.

This is the only module that sees ``lb.core``, ``lb.adapters`` and
``lb.control`` at once. It owns the mutable process state: the current
configuration, the health tracker and the monotonic counters that no reload
resets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lb.adapters.asyncio_endpoint import CallbackProtocol, VipProtocol
from lb.adapters.batched_socket import batched_io_available, open_datagram_port
from lb.adapters.udp_socket import bind_udp
from lb.control.config import BackendState, LbConfig, load_config
from lb.control.snapshot import BackendView, LbSnapshot, ReloadResult, ServiceView
from lb.control.table_builder import TableBuilder
from lb.core.addresses import Address, normalize_address
from lb.core.encapsulation import ProxyHeaderEncoder
from lb.core.health import NONCE_LEN, HealthTracker, build_probe, probe_reply_nonce_untrusted
from lb.core.quic_header import parse_routing_fields_untrusted
from lb.core.return_path import ReturnOutcome, ReturnPath
from lb.core.router import Router
from lb.core.service_table import Backend
from lb.errors import ConfigError, LbError, MalformedDatagram

if TYPE_CHECKING:
    from lb.control.admin_http import AdminServer

log = logging.getLogger("quiclb")

HealthKey = tuple[str, bytes]  # (service name, server ID)


def _fmt(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class _ServiceRuntime:
    router: Router
    vip: Address
    transport: asyncio.DatagramTransport
    protocol: VipProtocol


@dataclass
class _Counters:
    stale_cid_replies: dict[tuple[str, str], int] = field(default_factory=dict)
    stale_config: dict[tuple[str, str], bool] = field(default_factory=dict)
    tx_to_backend: dict[tuple[str, str], int] = field(default_factory=dict)
    backend_unreachable: dict[tuple[str, str], int] = field(default_factory=dict)
    tx_to_client_errors: int = 0
    reloads: int = 0
    rejected: int = 0
    last_reload_error: str | None = None


class LoadBalancer:
    """One LB process. ``start`` binds and serves; ``reload`` swaps configurations atomically."""

    def __init__(self, config: LbConfig, *, admin: bool = True, io: str = "asyncio") -> None:
        if io not in ("asyncio", "batched"):
            raise ValueError(f"io: must be 'asyncio' or 'batched', got {io!r}")
        if io == "batched" and not batched_io_available():
            raise LbError("--io batched needs recvmmsg/sendmmsg (Linux)")
        self.config = config
        self.admin_enabled = admin
        self.io = io
        lb = config.lb
        self.builder = TableBuilder()
        self.health: HealthTracker[HealthKey] = HealthTracker(
            lb.health_interval, lb.health_timeout, lb.health_threshold
        )
        self.return_path = ReturnPath(own_addresses=[config.lb.inside])
        self._backend_owner = self._owners(config)
        self.encoder = ProxyHeaderEncoder()
        self.counters = _Counters()
        self.services: dict[str, _ServiceRuntime] = {}
        self._vip_transports: dict[Address, asyncio.DatagramTransport] = {}
        self.inside_transport: asyncio.DatagramTransport | None = None
        # One health-probe socket per VIP address family: a probe's PROXY header
        # names the probe socket as client and the VIP as destination, and both
        # must be of one family. Keyed by IP version (4 or 6).
        self.probe_ports: dict[int, tuple[asyncio.DatagramTransport, Address]] = {}
        self.retired_routers: list[Router] = []  # counters of removed services stay visible
        self.started_at = time.time()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.admin: AdminServer | None = None
        self.admin_address: Address | None = None

    # -- start / stop ---------------------------------------------------------

    @staticmethod
    def _owners(config: LbConfig) -> dict[Address, tuple[str, bytes]]:
        """Backend address -> (service, server ID): who sent a reply."""
        return {normalize_address(b.address): (s.name, b.server_id) for s in config.services for b in s.backends}

    @staticmethod
    def _backend_addresses(config: LbConfig) -> list[Address]:
        return [b.address for s in config.services for b in s.backends]

    def _healthy(self, service: str, server_id: bytes) -> bool:
        return self.health.is_healthy((service, server_id))

    async def _ensure_probe_ports(self, cfg: LbConfig) -> None:
        """The health checker is a client of its own: probes carry its socket's address, and the
        VN answers come back through the return path, like any reply, from the VIP."""
        loop = asyncio.get_running_loop()
        for svc in cfg.services:
            family = ipaddress.ip_address(svc.vip[0]).version
            if family in self.probe_ports:
                continue
            sock = bind_udp((svc.vip[0], 0), reuse_port=False)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: CallbackProtocol(self._on_probe_reply), sock=sock
            )
            self.probe_ports[family] = (transport, normalize_address(sock.getsockname()[:2]))

    async def start(self) -> None:
        cfg = self.config
        self.health.set_targets((s.name, b.server_id) for s in cfg.services for b in s.backends)
        tables = self.builder.build(cfg, self._healthy)
        self.return_path.reconfigure(tables.values())
        self.inside_transport, _ = await open_datagram_port(
            bind_udp(cfg.lb.inside), lambda: CallbackProtocol(self._on_inside), self.io
        )
        await self._ensure_probe_ports(cfg)
        for svc in cfg.services:
            self.services[svc.name] = await self._open_endpoint(svc.name, svc.vip, Router(tables[svc.name]))
        self._index_vips()
        if cfg.lb.admin is not None and self.admin_enabled:
            await self._start_admin()
        self._tasks.append(asyncio.create_task(self._health_loop(), name="health"))
        log.info(
            "serving %d service(s); inside %s; config version %d digest %s",
            len(cfg.services), _fmt(cfg.lb.inside), cfg.version, cfg.digest[:16],
        )

    async def _open_endpoint(self, name: str, vip: Address, router: Router) -> _ServiceRuntime:
        vip_n = normalize_address(vip)
        forward = self._make_forward(name, vip_n)
        transport, protocol = await open_datagram_port(bind_udp(vip), lambda: VipProtocol(router, forward), self.io)
        assert isinstance(protocol, VipProtocol)
        return _ServiceRuntime(router, vip_n, transport, protocol)

    async def _start_admin(self) -> None:
        from lb.control.admin_http import AdminServer  # noqa: PLC0415 - only when configured
        from lb.control.keys import read_token_file  # noqa: PLC0415

        lb = self.config.lb
        assert lb.admin is not None and lb.admin_token_file is not None
        admin = AdminServer(
            snapshot=self.snapshot,
            reload=self.reload,
            route=self.route_info,
            token=read_token_file(lb.admin_token_file),
        )
        self.admin_address = await admin.start(*lb.admin)
        self.admin = admin
        log.info("admin API on %s", _fmt(self.admin_address))

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        loop.add_signal_handler(signal.SIGTERM, self._stopped.set)
        loop.add_signal_handler(signal.SIGINT, self._stopped.set)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self._stopped.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.admin is not None:
            await self.admin.close()
        for rt in self.services.values():
            rt.transport.close()
        if self.inside_transport is not None:
            self.inside_transport.close()
        for transport, _ in self.probe_ports.values():
            transport.close()
        log.info("stopped")

    # -- datapath callbacks ---------------------------------------------------

    def _make_forward(self, service: str, vip: Address) -> Callable[[bytes, Address, Backend], None]:
        encode = self.encoder.encode
        tx = self.counters.tx_to_backend
        unreachable = self.counters.backend_unreachable

        def forward(data: bytes, client: Address, backend: Backend) -> None:
            inside = self.inside_transport
            assert inside is not None
            key = (service, backend.label)
            try:
                inside.sendto(encode(client, vip) + data, backend.address)
            except (OSError, ValueError):
                unreachable[key] = unreachable.get(key, 0) + 1
                return
            tx[key] = tx.get(key, 0) + 1

        return forward

    def _index_vips(self) -> None:
        # Replies name their VIP; one dict lookup per reply instead of a scan of the services.
        self._vip_transports = {rt.vip: rt.transport for rt in self.services.values()}

    def _on_inside(self, data: bytes, source: Address) -> None:
        decision = self.return_path.handle(data, source)
        if decision.outcome is not ReturnOutcome.TO_CLIENT:
            return
        assert decision.vip is not None and decision.client is not None
        if decision.payload[:1] >= b"\xc0":  # long header with the fixed bit: a handshake reply
            self._check_reply_scid(source, decision.payload)
        transport = self._vip_transports.get(decision.vip)
        if transport is None:  # the VIP went away in a reload between check and send
            self.counters.tx_to_client_errors += 1
            return
        try:
            transport.sendto(decision.payload, decision.client)
        except (OSError, ValueError):
            self.counters.tx_to_client_errors += 1

    def _check_reply_scid(self, source: Address, payload: bytes) -> None:
        """R-20: a backend's handshake SCID must decode, under the LB's configurations, to that
        backend's server ID. If not, it mints CIDs with a key or configuration the LB lacks
        (rolled out to the backends before the LBs, or a stale key): every later datagram of
        those connections would be unroutable. Costs a parse and one decode per handshake
        reply; short-header replies are not looked at."""
        owner = self._backend_owner.get(normalize_address(source))
        if owner is None:
            return
        try:
            fields = parse_routing_fields_untrusted(payload)
        except MalformedDatagram:
            return
        if not fields.version or not fields.scid:  # VN (probe answers) or no SCID: nothing to check
            return
        service, sid = owner
        rt = self.services.get(service)
        if rt is None:
            return
        key = (service, sid.hex())
        ok = rt.router.table.decoder.decode(fields.scid) == sid
        was_stale = self.counters.stale_config.get(key, False)
        self.counters.stale_config[key] = not ok
        if not ok:
            self.counters.stale_cid_replies[key] = self.counters.stale_cid_replies.get(key, 0) + 1
            if not was_stale:
                log.error(
                    "backend %s/%s issues CIDs that do not decode to it with the LB's configurations "
                    "(config bits %d): its clients' packets will be unroutable; roll the configuration "
                    "out to the LBs first", service, sid.hex(), fields.scid[0] >> 5,
                )
        elif was_stale:
            log.warning("backend %s/%s issues routable CIDs again", service, sid.hex())

    def _on_probe_reply(self, data: bytes, source: Address) -> None:
        nonce = probe_reply_nonce_untrusted(data)
        if nonce is None:
            return
        result = self.health.on_reply(nonce, asyncio.get_running_loop().time())
        if result is not None and result[1]:
            service, sid = result[0]
            log.warning("backend %s/%s is up again", service, sid.hex())
            self._rebuild({service})

    # -- control --------------------------------------------------------------

    def _rebuild(self, only: set[str] | None = None) -> None:
        """Rebuild the tables of ``only`` these services (default: all) from config, health, tombstones.

        A Maglev build takes tens of milliseconds of event-loop time per service,
        so health changes rebuild just the service they concern.
        """
        for svc in self.config.services:
            rt = self.services.get(svc.name)
            if rt is not None and (only is None or svc.name in only):
                rt.router.set_table(self.builder.build_service(self.config, svc, self._healthy))

    async def _health_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopped.is_set():
            now = loop.time()
            changed = self.health.expire(now)
            for service, sid in changed:
                log.warning("backend %s/%s is down: %d probes unanswered", service, sid.hex(),
                            self.health.threshold)
            if self.builder.expire(time.time()):
                self._rebuild()
            elif changed:
                self._rebuild({service for service, _ in changed})
            self._send_probes(now)
            delay = self.health.next_wakeup(loop.time()) - loop.time()
            await asyncio.sleep(min(max(delay, 0.01), self.health.interval))

    def _send_probes(self, now: float) -> None:
        inside = self.inside_transport
        if inside is None:
            return
        for key, nonce in self.health.due(now, lambda: secrets.token_bytes(NONCE_LEN)):
            service, sid = key
            svc = next((s for s in self.config.services if s.name == service), None)
            backend = svc.backend_by_server_id(sid) if svc else None
            port = self.probe_ports.get(ipaddress.ip_address(svc.vip[0]).version) if svc else None
            if svc is None or backend is None or port is None:
                continue
            try:
                inside.sendto(self.encoder.encode(port[1], svc.vip) + build_probe(nonce), backend.address)
            except (OSError, ValueError) as exc:
                # Counted as a miss when the timeout expires; say why once per probe.
                log.warning("health probe to %s/%s not sent: %s", service, sid.hex(), exc)

    async def reload(self) -> ReloadResult:
        """Load, validate and swap the whole configuration; on any error keep the running one."""
        async with self._reload_lock:
            old = self.config
            try:
                new = load_config(old.path)
                self._check_restart_only(old, new)
                await self._apply(old, new)
            except (LbError, OSError, ValueError) as exc:
                self.counters.rejected += 1
                self.counters.last_reload_error = str(exc)
                log.error("reload rejected, keeping config version %d: %s", old.version, exc)
                return ReloadResult(False, str(exc), old.version, old.digest)
            self.counters.reloads += 1
            self.counters.last_reload_error = None
            log.info("reloaded: config version %d digest %s", new.version, new.digest[:16])
            return ReloadResult(True, "reloaded", new.version, new.digest)

    @staticmethod
    def _check_restart_only(old: LbConfig, new: LbConfig) -> None:
        """Settings a running process cannot change: refuse the reload rather than pretend."""
        for key, before, after in (
            ("lb.inside", normalize_address(old.lb.inside), normalize_address(new.lb.inside)),
            ("lb.admin", old.lb.admin, new.lb.admin),
        ):
            if before != after:
                raise ConfigError(f"{old.path}: {key}: changing it needs a restart (running with {before})")

    async def _apply(self, old: LbConfig, new: LbConfig) -> None:
        # Phase 1, may fail or await: nothing visible changes. Bind and open the
        # endpoints of new or moved VIPs, read the new admin token.
        now = time.time()
        for warning in self.builder.reuse_warnings(new, now):
            log.warning("%s", warning)
        token = None
        if self.admin is not None and new.lb.admin_token_file is not None:
            from lb.control.keys import read_token_file  # noqa: PLC0415

            token = read_token_file(new.lb.admin_token_file)
        opened: dict[str, _ServiceRuntime] = {}
        try:
            await self._ensure_probe_ports(new)
            for svc in new.services:
                rt = self.services.get(svc.name)
                if rt is not None and rt.vip == normalize_address(svc.vip):
                    continue
                # A moved VIP keeps its router, and so its counters (they never reset on reload).
                router = rt.router if rt is not None else Router(self.builder.build_service(new, svc, self._healthy))
                opened[svc.name] = await self._open_endpoint(svc.name, svc.vip, router)
        except BaseException:
            for runtime in opened.values():
                runtime.transport.close()
            raise
        # Phase 2, synchronous (no await, so no health callback can interleave):
        # build every table from the new config and swap everything at once.
        self.health.configure(new.lb.health_interval, new.lb.health_timeout, new.lb.health_threshold)
        self.health.set_targets((s.name, b.server_id) for s in new.services for b in s.backends)
        self.builder.note_reload(old, new, now)
        tables = self.builder.build(new, self._healthy)
        for name in [n for n in self.services if n not in tables or n in opened]:
            runtime = self.services.pop(name)
            runtime.transport.close()
            if name not in tables:
                self.retired_routers.append(runtime.router)
        self.services.update(opened)
        self._index_vips()
        for name, runtime in self.services.items():
            runtime.router.set_table(tables[name])
        self.return_path.reconfigure(tables.values(), own_addresses=[new.lb.inside])
        self._backend_owner = self._owners(new)
        if token is not None:
            assert self.admin is not None
            self.admin.set_token(token)
        self.config = new

    # -- observation ----------------------------------------------------------

    def route_info(self, service: str | None, dcid: bytes) -> dict[str, object]:
        """"Which backend owns this CID?" for the admin API (no traffic is generated)."""
        if service is not None and service not in self.services:
            raise LookupError(f"no service named {service!r}")
        out: dict[str, object] = {"dcid_len": len(dcid)}
        for name, rt in self.services.items():
            if service is not None and name != service:
                continue
            table = rt.router.table
            sid = table.decoder.decode(dcid)
            backend = table.backends.get(sid) if sid is not None else None
            entry: dict[str, object] = {
                "config_id": dcid[0] >> 5 if dcid else None,
                "server_id": sid.hex() if sid is not None else None,
                "backend": _fmt(backend.address) if backend else None,
                "routable": backend is not None,
                "tombstoned": sid in table.tombstones if sid is not None else False,
            }
            out[name] = entry
        return out

    def snapshot(self) -> LbSnapshot:
        services, backends = [], []
        for svc in self.config.services:
            rt = self.services.get(svc.name)
            table = rt.router.table if rt else None
            services.append(ServiceView(
                name=svc.name, vip=_fmt(svc.vip), config_ids=tuple(c.config_id for c in svc.cid_configs),
                linkable=svc.linkable, fallback_backends=len(table.fallback_backends) if table else 0,
            ))
            for b in svc.backends:
                label = b.server_id.hex()
                status = self.health.status((svc.name, b.server_id))
                backends.append(BackendView(
                    service=svc.name, server_id=label, address=_fmt(b.address),
                    state="draining" if b.state is BackendState.DRAINING else "active",
                    healthy=status.healthy if status else True,
                    in_fallback=bool(table and b.server_id in table.fallback_backends),
                    tx_datagrams=self.counters.tx_to_backend.get((svc.name, label), 0),
                    unreachable=self.counters.backend_unreachable.get((svc.name, label), 0),
                    probes=status.probes if status else 0,
                    probe_replies=status.replies if status else 0,
                    last_probe_rtt=status.last_rtt if status else None,
                    stale_cid_replies=self.counters.stale_cid_replies.get((svc.name, label), 0),
                    stale_config=self.counters.stale_config.get((svc.name, label), False),
                ))
            for sid in sorted(self.builder.tombstones(svc.name)):
                label = sid.hex()
                backends.append(BackendView(
                    service=svc.name, server_id=label, address="", state="removed", healthy=False,
                    in_fallback=False, tx_datagrams=self.counters.tx_to_backend.get((svc.name, label), 0),
                    unreachable=0, probes=0, probe_replies=0, last_probe_rtt=None,
                ))
        return LbSnapshot(
            routers=tuple(r.stats() for r in [*(rt.router for rt in self.services.values()), *self.retired_routers]),
            return_path=self.return_path.stats(),
            services=tuple(services),
            backends=tuple(backends),
            config_path=str(self.config.path),
            config_version=self.config.version,
            config_digest=self.config.digest,
            config_reloads=self.counters.reloads,
            config_rejected=self.counters.rejected,
            last_reload_error=self.counters.last_reload_error,
            fallback_table_builds=self.builder.builds,
            started_at=self.started_at,
            pid=os.getpid(),
            extra={"tx_to_client_errors": self.counters.tx_to_client_errors},
        )


async def serve(
    config: LbConfig,
    ready: Callable[[LoadBalancer], Awaitable[None] | None] | None = None,
    *,
    admin: bool = True,
    io: str = "asyncio",
) -> None:
    """Run one LB process until SIGTERM/SIGINT (``admin=False``: no admin API, for extra workers)."""
    lb = LoadBalancer(config, admin=admin, io=io)
    await lb.start()
    lb.install_signal_handlers()
    if ready is not None:
        result = ready(lb)
        if asyncio.iscoroutine(result):
            await result
    try:
        await lb.wait_stopped()
    finally:
        await lb.stop()
