"""The backend process core: decapsulate, hand aioquic the real client, send replies back.

Data path (design §4)::

    LB inside socket --PROXY v2 + client datagram--> backend socket
        -> source check (only LB addresses) -> decapsulate_untrusted
        -> QuicServer.datagram_received(inner, real client address)
    aioquic -> ReplyShim.sendto(reply, client)
        via-lb: PROXY v2 (source = client, destination = VIP) + reply -> LB inside
        direct: raw IPv4 packet from the VIP straight to the client (backends.dsr)

aioquic only ever calls ``sendto(data, addr)`` and ``close()`` on its
transport, and treats ``addr`` as an opaque value compared with ``==``, so it
never notices that the "socket" it writes to is a shim. It must be given the
*real* client address: path validation, NAT-rebinding detection and the 3x
anti-amplification limit all key on it (acceptance S-8).

Every connection gets its host CIDs from :class:`lb.core.cid_issuer.CidIssuer`
through :mod:`backends.routable_cids`; the one ``connection_id_length`` of the
process is the newest cid_config's ``cid_len``. aioquic's own Retry (random
8-byte SCID, per-process key) breaks behind a CID-routing LB; with the
service's ``retry`` on, tokens in the shared-state format of the LB are
checked instead, and reset tokens come from the shared reset key
(:mod:`backends.stateless`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent

from backends.apps import BACKEND_ALPNS, Application, BackendIdentity, application_for
from backends.dsr import DirectReturnSender
from backends.routable_cids import (
    install_routable_cids,
    is_live_cid,
    is_unknown_cid,
    release_connection,
    unique_cid_source,
)
from backends.settings import RETURN_DIRECT, Address, BackendSettings, source_matcher
from backends.shim import DecapEndpoint, ReplyShim
from backends.stateless import Resetter, RetryTokens, reset_token_source
from backends.stats import BackendStats
from backends.tls import TlsIdentity, identity_for
from lb.core.addresses import canonical_host, ip_version
from lb.core.cid_issuer import CidIssuer
from lb.core.encapsulation import ProxyHeaderEncoder, decapsulate_untrusted
from lb.core.retry_token import TokenKey
from lb.errors import ConfigError, MalformedDatagram

log = logging.getLogger("quiclb.backend")

#: Events queued per connection before its application is known (the handshake is done).
MAX_PENDING_EVENTS = 64
#: Requested socket buffer sizes; the kernel may clamp them.
SOCKET_BUFFER_BYTES = 4 << 20


class BackendProtocol(QuicConnectionProtocol):
    """One QUIC connection; picks the application by negotiated ALPN at handshake completion."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: QuicStreamHandler | None = None,
        *,
        backend: BackendServer,
    ) -> None:
        super().__init__(quic, stream_handler=stream_handler)
        self.connection = quic
        self._backend = backend
        self._app: Application | None = None
        self._pending: list[QuicEvent] = []
        self._terminated = False

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self._app = application_for(event.alpn_protocol, self.connection, self._backend.app_identity)
            pending, self._pending = self._pending, []
            if self._app is not None:
                for queued in pending:
                    self._app.handle_event(queued)
        elif isinstance(event, ConnectionTerminated):
            if not self._terminated:
                self._terminated = True
                self._backend.connection_ended(self)
        elif self._app is not None:
            self._app.handle_event(event)
        elif len(self._pending) < MAX_PENDING_EVENTS:
            self._pending.append(event)


class BackendServer:
    """One backend: owns the UDP socket, the aioquic server, the CID issuer and the counters.

    Call :meth:`start` inside a running event loop. ``reload_source`` (optional)
    produces fresh settings for :meth:`reload`. ``max_cids`` caps the routable CIDs
    of each configuration (default: the whole nonce space); past it the issuer
    hands out self-describing 0b111 CIDs (-21 §9.6), counted as ``issued_cids{config="7"}``.
    """

    def __init__(
        self,
        settings: BackendSettings,
        *,
        identity: TlsIdentity | None = None,
        reload_source: Callable[[], BackendSettings] | None = None,
        idle_timeout: float = 60.0,
        max_cids: int | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity if identity is not None else identity_for(
            settings.certificate, settings.private_key
        )
        self.stats = BackendStats()
        self.app_identity = BackendIdentity(settings.server_id, settings.service)
        self.reload_source = reload_source
        self._idle_timeout = idle_timeout
        self._max_cids = max_cids
        self._issuer = CidIssuer(settings.newest_cid_config, settings.server_id, max_cids=max_cids)
        self._exhaustion_logged = False
        self._encoder = ProxyHeaderEncoder()
        self._exact_sources, self._any_port_sources = source_matcher(settings.lb_addresses)
        self._dsr: DirectReturnSender | None = None
        if settings.return_mode == RETURN_DIRECT:
            self._dsr = DirectReturnSender(settings.vip)
        self._transport: asyncio.DatagramTransport | None = None
        self._quic_server: QuicServer | None = None
        self._closing = False
        #: Live connections (until ConnectionTerminated).
        self.protocols: set[BackendProtocol] = set()
        self.address: Address = settings.address
        self._quic_config = self._quic_configuration()
        self._supported_versions = frozenset(self._quic_config.supported_versions)
        self._stateless(settings)

    def _stateless(self, settings: BackendSettings) -> None:
        """Retry tokens shared with the LB and stateless resets (issue 9), from ``settings``."""
        key = TokenKey.from_secret(settings.retry_key) if settings.retry_key is not None else None
        self._retry_tokens = RetryTokens(settings.retry, key, self.stats.retry_tokens)
        self._reset_token = reset_token_source(settings.reset_key, settings.server_id)
        self._resetter = (
            None if settings.reset_key is None
            else Resetter(settings.reset_key, settings.server_id, settings.cid_configs, settings.cid_len)
        )
        if self._quic_server is not None:
            self._retry_tokens.install(self._quic_server)

    # -- lifecycle -----------------------------------------------------------------

    def _quic_configuration(self) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=False,
            alpn_protocols=list(BACKEND_ALPNS),
            connection_id_length=self.settings.cid_len,
            idle_timeout=self._idle_timeout,
        )
        if self.settings.supported_versions:
            config.supported_versions = list(self.settings.supported_versions)
        self.identity.apply(config)
        return config

    async def start(self) -> None:
        """Bind the backend address and start serving."""
        loop = asyncio.get_running_loop()
        self._quic_server = QuicServer(
            configuration=self._quic_config, create_protocol=self._create_protocol, retry=False
        )
        self._retry_tokens.install(self._quic_server)
        host, port = self.settings.address
        family = socket.AF_INET6 if ip_version(host) == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
                except OSError:
                    pass
            sock.bind((host, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        bound = sock.getsockname()
        self.address = (canonical_host(bound[0]), bound[1])
        transport, _ = await loop.create_datagram_endpoint(lambda: DecapEndpoint(self), sock=sock)
        self._transport = transport
        self._quic_server.connection_made(ReplyShim(self))
        log.info(
            "backend %s serving on %s:%d, cid_len=%d, config_id=%d, return_mode=%s",
            self.settings.server_id.hex(), self.address[0], self.address[1], self.settings.cid_len,
            self.settings.newest_cid_config.config_id, self.settings.return_mode,
        )

    def close(self) -> None:
        """Close every connection (CONNECTION_CLOSE goes out) and then the socket."""
        if self._quic_server is not None and not self._closing:
            self._quic_server.close()  # ends with ReplyShim.close -> close_socket
        self.close_socket()

    def close_socket(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()
        if self._dsr is not None:
            self._dsr.close()
            self._dsr = None

    @property
    def is_closing(self) -> bool:
        return self._closing

    @property
    def quic_server(self) -> QuicServer:
        assert self._quic_server is not None, "start() first"
        return self._quic_server

    def socket_extra_info(self, name: str, default: Any = None) -> Any:
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)

    # -- connections and CIDs ------------------------------------------------------

    def _create_protocol(
        self, connection: QuicConnection, stream_handler: QuicStreamHandler | None = None
    ) -> BackendProtocol:
        server = self.quic_server
        odcid = connection.original_destination_connection_id

        def taken(cid: bytes) -> bool:
            return cid == odcid or is_live_cid(server, cid)

        # Plaintext CIDs are linkable: issue just the handshake SCID and ask the
        # client not to migrate (draft -21 §9); likewise once the issuer is out
        # of nonces and hands out 0b111 CIDs (§3.2).
        install_routable_cids(
            connection, unique_cid_source(self._next_cid, taken), single_cid=self._single_cid(),
            hold_new_cids=self._single_cid, reset_token=self._reset_token,
        )
        self.stats.connections_open += 1
        self.stats.connections_total += 1
        protocol = BackendProtocol(connection, stream_handler, backend=self)
        self.protocols.add(protocol)
        return protocol

    def _single_cid(self) -> bool:
        """True while new CIDs would be linkable (plaintext) or unroutable (nonces exhausted)."""
        return self._issuer.cfg.key is None or self._issuer.exhausted

    def _next_cid(self) -> bytes:
        cid = self._issuer.next_cid()
        label = str(cid[0] >> 5)  # the config bits; "7" = unroutable (issuer exhausted)
        self.stats.issued_cids[label] = self.stats.issued_cids.get(label, 0) + 1
        if self._issuer.nearly_exhausted and not self._exhaustion_logged:
            self._exhaustion_logged = True
            log.warning(
                "CID nonces of config %d nearly exhausted (%d issued): roll out a new cid_config",
                self._issuer.cfg.config_id, self._issuer.issued,
            )
        return cid

    def connection_ended(self, protocol: BackendProtocol) -> None:
        self.protocols.discard(protocol)
        self.stats.connections_open -= 1
        # Issue 13 item 4: a finished connection is a web of reference cycles that only a
        # full collection frees, and tune_gc() makes those rare, so backends grew ~14 KB per
        # connection. Cut the cycles once aioquic has returned from the call that ended it.
        asyncio.get_running_loop().call_soon(release_connection, protocol)

    # -- data path -----------------------------------------------------------------

    def _source_allowed(self, addr: tuple[Any, ...]) -> bool:
        host, port = addr[0], addr[1]
        # Fast path: the kernel's text form of an address is already canonical.
        if (host, port) in self._exact_sources or host in self._any_port_sources:
            return True
        try:  # IPv4-mapped IPv6 or a scoped address
            ip = canonical_host(host)
        except ValueError:
            return False
        return (ip, port) in self._exact_sources or ip in self._any_port_sources

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        stats = self.stats
        stats.datagrams_in += 1
        if not self._source_allowed(addr):
            stats.reject("source")
            return
        try:
            header, inner = decapsulate_untrusted(data)
        except MalformedDatagram as exc:
            stats.reject(exc.reason)
            return
        server = self.quic_server
        client: NetworkAddress = header.source
        if is_unknown_cid(inner, self.settings.cid_len, self._supported_versions, server):
            stats.unknown_cid_packets += 1
            if self._resetter is not None:
                # A connection this process does not know (it restarted, or the connection ended):
                # tell the client now instead of letting it wait for its idle timeout.
                reset = self._resetter.reset_for(inner, client, time.time())
                if reset is not None:
                    stats.resets_sent += 1
                    self.send_reply(reset, client)
            return  # aioquic would drop it too
        retry = self._retry_tokens
        if retry.handler is not None:
            if retry.refuses(inner):
                stats.reject("initial_dcid")
                return
            if retry.per_datagram:
                retry.before_datagram(server, inner)
        server.datagram_received(inner, client)

    def send_reply(self, data: bytes, addr: Any) -> None:
        """aioquic's ``sendto``: ``addr`` is the client address we gave it."""
        if self._closing or self._transport is None:
            return
        client = (addr[0], addr[1])
        if self._dsr is not None:
            try:
                self._dsr.send(data, client)
            except (OSError, ValueError) as exc:
                self.stats.send_errors += 1
                log.debug("direct reply failed: %s", exc)
                return
        else:
            try:
                packet = self._encoder.encapsulate(client, self.settings.vip, data)
            except ValueError as exc:  # client and VIP of different families
                self.stats.send_errors += 1
                log.debug("cannot encapsulate reply: %s", exc)
                return
            self._transport.sendto(packet, self.settings.lb_inside)
        self.stats.datagrams_out += 1

    # -- reload --------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the configuration (SIGHUP). On any error keep running unchanged."""
        if self.reload_source is None:
            log.error("reload: no configuration file to re-read")
            return False
        try:
            new = self.reload_source()
            self.apply_settings(new)
        except (ConfigError, OSError, ValueError) as exc:
            self.stats.reload_failures += 1
            log.error("reload refused, keeping the running configuration: %s", exc)
            return False
        return True

    def apply_settings(self, new: BackendSettings) -> None:
        """Swap in ``new`` whole, or raise :class:`ConfigError` and change nothing."""
        old = self.settings
        if new.server_id != old.server_id:
            raise ConfigError(f"server_id changed ({old.server_id.hex()} -> {new.server_id.hex()}): restart")
        if new.cid_len != old.cid_len:
            # aioquic has one connection_id_length per process: it parses short headers with it.
            raise ConfigError(
                f"newest cid_config has cid_len {new.cid_len}, the running backend uses {old.cid_len}: "
                "a CID length change needs a backend restart"
            )
        if new.address != old.address:
            raise ConfigError(f"backend address changed ({old.address} -> {new.address}): restart")
        identity = self.identity
        if (new.certificate, new.private_key) != (old.certificate, old.private_key):
            identity = identity_for(new.certificate, new.private_key)
        dsr: DirectReturnSender | None = None
        if new.return_mode == RETURN_DIRECT:
            dsr = self._dsr if self._dsr is not None and new.vip == old.vip else DirectReturnSender(new.vip)
        # Nothing can fail from here on.
        if self._dsr is not None and self._dsr is not dsr:
            self._dsr.close()
        self._dsr = dsr
        if new.newest_cid_config != old.newest_cid_config:
            self._issuer = CidIssuer(new.newest_cid_config, new.server_id, max_cids=self._max_cids)
            self._exhaustion_logged = False
        if identity is not self.identity:
            self.identity = identity
            identity.apply(self._quic_config)  # used by connections created from now on
        self._exact_sources, self._any_port_sources = source_matcher(new.lb_addresses)
        self._stateless(new)
        self.settings = new
        self.app_identity = BackendIdentity(new.server_id, new.service)
        self.stats.reloads += 1
        log.info(
            "reloaded: config_id=%d, return_mode=%s, %d LB address(es)",
            new.newest_cid_config.config_id, new.return_mode, len(new.lb_addresses),
        )
