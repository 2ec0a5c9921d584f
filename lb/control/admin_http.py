"""The admin HTTP API: health, metrics, read-only views, a CID lookup, reload and the status page (S-7).

HTTP/1.1 is aiohttp's (its low-level :class:`aiohttp.web.Server`, which runs
on asyncio and uvloop); this module holds the admin rules. Every response
closes its connection (``Connection: close``): one request per connection.

Rules:

- **One table.** Every route is a :class:`Route` in :attr:`AdminServer.routes`.
  Authentication is not a property of a route: :meth:`AdminServer._dispatch`
  demands the bearer token for every path outside :data:`PUBLIC_PATHS`
  (``/healthz`` and the static status page ``/``) *before* it looks the path
  up, so a new route — or an unknown path — can never skip it. A test walks
  the table to prove it. Paths are matched as sent, never percent-decoded.
- **Bearer token**, compared with :func:`hmac.compare_digest`. Missing or wrong:
  401 with ``WWW-Authenticate: Bearer``, counted in :attr:`AdminServer.auth_failures`
  and logged at WARNING with the peer, method and path — never the presented
  token, never the query string (which may carry a full CID, S-10).
- **Rate limit without lockout of the right token.** :class:`AuthRateLimiter`:
  ``max_failures`` failures within ``window`` seconds from one peer (an IPv4
  address or an IPv6 /64) turn its further *failures* into 429 with
  ``Retry-After`` for ``lockout`` seconds; the right token is always served
  (issue 12, item 13).
- **Mutations are POST only.** A path served with another method answers 405
  with ``Allow``; ``GET /reload`` is 405.
- **Slow or large clients cannot pin the server** (see
  :mod:`lb.control.admin_connections`): the head must reach the handler
  within ``read_timeout`` (408), the body too (408); the head is at most
  :data:`MAX_REQUEST_HEAD` bytes and :data:`MAX_HEADERS` fields (431), a
  body at most :data:`MAX_BODY` (413); chunked bodies are refused (501);
  a peer's waiting connections are capped, oldest evicted first, so
  ``/healthz`` keeps answering under a slowloris.
- **The datapath shares this loop.** Large answers (``/metrics``,
  ``/backends``) are encoded in a worker thread from a snapshot taken on the
  loop, so a scrape of thousands of backends does not stall forwarding.
- **HTTP/1.0 and 1.1 only.** aiohttp also parses HTTP/0.9 and "HTTP/2.0"
  request lines; they get a closed connection (no status line would be
  truthful), other malformed requests aiohttp's 400.
- **No key material.** Views come from :class:`~lb.control.snapshot.LbSnapshot`,
  which holds counters, names and digests only (S-3).

Binding policy (loopback unless ``admin_bind_any``) is enforced by the
configuration (``lb.control.config``); this server requires a token always.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from lb.control.admin_auth import AuthRateLimiter, bearer_token, peer_key
from lb.control.admin_connections import LINGER_SECONDS, PENDING_BYTES_CAP, ConnectionGuard, GuardedProtocol
from lb.control.admin_messages import (
    TEXT_CONTENT_TYPE,
    AdminHttpError,
    Request,
    Response,
    Route,
    error_response,
    exception_message,
    json_response,
    query_params,
    single_param,
)
from lb.control.admin_requests import (
    HTTP_VERSIONS,
    MAX_BODY,
    MAX_HEADERS,
    MAX_REQUEST_HEAD,
    ClientNoiseLog,
    read_request,
    to_web,
)
from lb.control.metrics import AdminCounters, LbCollector, encode_metrics, lb_registry
from lb.control.snapshot import LbSnapshot, ReloadResult
from lb.control.status_page import HTML_CONTENT_TYPE, status_page_headers, status_page_html
from lb.errors import LbError

__all__ = [
    "MAX_BODY",
    "MAX_HEADERS",
    "MAX_REQUEST_HEAD",
    "PUBLIC_PATHS",
    "AdminServer",
    "AuthRateLimiter",
    "Route",
    "peer_key",
]

logger = logging.getLogger(__name__)

#: Longest DCID /route accepts: the QUIC v1 limit (RFC 9000 §17.2).
MAX_DCID_LEN = 20
#: Longest ``service`` query value.
MAX_SERVICE_NAME_LEN = 128
DEFAULT_READ_TIMEOUT = 5.0
DEFAULT_WRITE_TIMEOUT = 5.0

#: The only paths served without the bearer token: liveness, and the status page, which holds no data.
PUBLIC_PATHS = frozenset({"/healthz", "/"})

_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


class AdminServer:
    """The admin API over a snapshot provider, a reload coroutine and a CID lookup.

    ``snapshot()`` builds a fresh :class:`LbSnapshot`; ``reload()`` applies the
    configuration file again; ``route(service, dcid)`` answers "which backend
    owns this CID?" as a JSON-able mapping (raising :class:`LookupError` for an
    unknown service, 404, or :class:`ValueError` for an unusable DCID, 400).
    ``token`` is required: the API has no unauthenticated mode.
    """

    def __init__(
        self,
        *,
        snapshot: Callable[[], LbSnapshot],
        reload: Callable[[], Awaitable[ReloadResult]],
        route: Callable[[str | None, bytes], Mapping[str, object]],
        token: str | None,
        rate_limiter: AuthRateLimiter | None = None,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        draining: Callable[[], bool] | None = None,
    ) -> None:
        self._token = b""
        #: True while the LB drains: ``/healthz`` answers 503 ``draining`` (its BGP speaker withdraws).
        self._draining = draining
        self.set_token(token)
        self._snapshot = snapshot
        self._reload = reload
        self._route = route
        self._limiter = rate_limiter if rate_limiter is not None else AuthRateLimiter()
        self._clock = clock
        self._guard = ConnectionGuard(read_timeout=read_timeout, write_timeout=write_timeout)
        self._http: web.Server | None = None
        self._listener: asyncio.Server | None = None
        self._reload_lock = asyncio.Lock()
        #: Requests refused for a missing or wrong token, or while locked out (monotonic).
        self.auth_failures = 0
        self.routes: tuple[Route, ...] = (
            Route("GET", "/", self._get_status_page, "status page (static; reads the API with the token)"),
            Route("GET", "/healthz", self._get_healthz, "liveness; no token; 503 draining after SIGUSR1"),
            Route("GET", "/metrics", self._get_metrics, "Prometheus text 0.0.4, or OpenMetrics by Accept"),
            Route("GET", "/backends", self._get_backends, "backends with state and counters"),
            Route("GET", "/services", self._get_services, "services (VIP, configs, linkable)"),
            Route("GET", "/config", self._get_config, "running configuration identity"),
            Route("GET", "/route", self._get_route, "which backend owns ?dcid=<hex>[&service=<name>]"),
            Route("POST", "/reload", self._post_reload, "reload the configuration file"),
        )
        self._by_path = {r.path: r for r in self.routes}
        if len(self._by_path) != len(self.routes):
            raise ValueError("admin routes: one method per path")

    @property
    def open_connections(self) -> int:
        """Connections open now: waiting for their request, in a handler, or writing the response."""
        return len(self._guard)

    def _admin_counters(self) -> AdminCounters:
        guard = self._guard
        return AdminCounters(
            auth_failures=self.auth_failures,
            connections_open=len(guard),
            connections_evicted=guard.evicted,
            connections_refused=guard.refused,
            head_timeouts=guard.head_timeouts,
        )

    def set_token(self, token: str | None) -> None:
        """Replace the bearer token (a reload rotates it; the old one stops working at once)."""
        if not token:
            raise ValueError("the admin API requires a bearer token (lb.admin_token_file)")
        if not all("\x21" <= c <= "\x7e" for c in token):
            raise ValueError("the admin token must be visible ASCII only")
        self._token = token.encode("ascii")

    # -- lifecycle --------------------------------------------------------------

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0 picks one); returns the bound address."""
        if self._listener is not None:
            raise RuntimeError("admin server already started")
        self._http = web.Server(
            self._handle,
            access_log=None,
            logger=ClientNoiseLog(logging.getLogger(__name__ + ".protocol"), {}),
            # The guard enforces the real deadlines (408); aiohttp's idle timer is a backstop.
            keepalive_timeout=2 * self._guard.read_timeout,
            # Loose enough that the head-size rules below answer 431; the guard's byte cap bounds the rest.
            max_line_size=PENDING_BYTES_CAP,
            max_field_size=PENDING_BYTES_CAP,
            max_headers=4 * MAX_HEADERS,
            # A body nobody reads (413, 408) is drained this long before the close (else: a reset).
            lingering_time=LINGER_SECONDS,
        )
        factory = self._guard.protocol_factory(self._http)
        self._listener = await asyncio.get_running_loop().create_server(factory, host, port)
        sockname = self._listener.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def close(self) -> None:
        """Stop listening and end connections in progress."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._guard.close_all()
        if self._http is not None:
            await self._http.shutdown(self._guard.write_timeout)
        if listener is not None:
            await listener.wait_closed()

    # -- one request ----------------------------------------------------------------

    async def _handle(self, http_request: web.BaseRequest) -> web.StreamResponse:
        conn = self._guard.connection_of(http_request.transport)
        if conn is not None:
            conn.request_started()
        try:
            if http_request.version not in HTTP_VERSIONS:
                return self._hang_up(http_request, conn)
            try:
                request = await read_request(http_request, conn, self._guard.read_timeout)
                response = await self._dispatch(request)
            except AdminHttpError as exc:
                response = error_response(exc.status, exc.message)
            except Exception:  # a bug here must not become aiohttp's own 500 page
                logger.exception("admin: unexpected error serving %s", http_request.method)
                response = error_response(500, "internal error; see the LB log")
            return to_web(response)
        finally:
            if conn is not None:
                conn.response_ready()

    def _hang_up(self, http_request: web.BaseRequest, conn: GuardedProtocol | None) -> web.StreamResponse:
        if conn is not None:
            conn.abort()
        elif http_request.transport is not None:
            http_request.transport.abort()
        return web.Response(status=400)  # written nowhere: the transport is gone

    # -- routing and authentication -----------------------------------------------

    async def _dispatch(self, request: Request) -> Response:
        if request.path not in PUBLIC_PATHS:
            refusal = self._authorize(request)
            if refusal is not None:
                return refusal
        route = self._by_path.get(request.path)
        if route is None:
            return error_response(404, "no such admin route")
        if request.method != route.method:
            return error_response(405, f"use {route.method}", (("Allow", route.method),))
        try:
            return await route.handler(request)
        except AdminHttpError as exc:
            return error_response(exc.status, exc.message)
        except Exception:
            logger.exception("admin: %s %s failed", route.method, route.path)
            return error_response(500, "internal error; see the LB log")

    def _authorize(self, request: Request) -> Response | None:
        """``None`` when the request carries the token; otherwise the 401 or 429 to send.

        The token is compared first: a peer locked out for its failures is still
        served when it presents the right token.
        """
        header = request.headers.get("authorization")
        presented = bearer_token(header)
        # aiohttp decodes header bytes as UTF-8 with surrogateescape: encoding back gives the bytes sent.
        if presented is not None and hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), self._token):
            return None
        self.auth_failures += 1
        now = self._clock()
        wait = self._limiter.retry_after(request.peer, now)
        if wait is not None:
            # Locked out: no log line per attempt (the lockout was logged once).
            return error_response(429, "too many failed attempts", (("Retry-After", str(math.ceil(wait))),))
        if header is None:
            reason = "no Authorization header"
        elif presented is None:
            reason = "Authorization is not a bearer token"
        else:
            reason = "wrong token"
        # Never the token, nor the query string (it may hold a full CID: S-10).
        logger.warning("admin: refused %s %r from %s: %s", request.method, request.path[:64], request.peer, reason)
        if self._limiter.record_failure(request.peer, now):
            logger.warning(
                "admin: %s: failures answered 429 for %.0f s after %d within %.0f s",
                request.peer,
                self._limiter.lockout,
                self._limiter.max_failures,
                self._limiter.window,
            )
        return error_response(401, "bearer token required", (("WWW-Authenticate", 'Bearer realm="quiclb"'),))

    # -- handlers -----------------------------------------------------------------

    async def _get_status_page(self, request: Request) -> Response:
        return Response(200, status_page_html(), HTML_CONTENT_TYPE, status_page_headers())

    async def _get_healthz(self, request: Request) -> Response:
        if self._draining is not None and self._draining():
            return Response(503, b"draining\n", TEXT_CONTENT_TYPE)
        return Response(200, b"ok\n", TEXT_CONTENT_TYPE)

    async def _get_metrics(self, request: Request) -> Response:
        # The snapshot is taken here, on the loop (a consistent view, and cheap); encoding costs
        # prometheus-client ~7 us a sample (0.2 s for 2,600 backends), so it runs in a worker
        # thread: a large scrape costs the datapath GIL slices, not a stall.
        snap, admin = self._snapshot(), self._admin_counters()
        registry = lb_registry(LbCollector(lambda: snap, admin=lambda: admin))
        body, content_type = await asyncio.to_thread(encode_metrics, registry, request.headers.get("accept"))
        return Response(200, body, content_type)

    async def _get_backends(self, request: Request) -> Response:
        views = self._snapshot().backends  # frozen views: safe to encode in a worker thread, as /metrics
        return await asyncio.to_thread(lambda: json_response(200, [dataclasses.asdict(b) for b in views]))

    async def _get_services(self, request: Request) -> Response:
        return json_response(200, [dataclasses.asdict(s) for s in self._snapshot().services])

    async def _get_config(self, request: Request) -> Response:
        snap = self._snapshot()
        return json_response(
            200,
            {
                "path": snap.config_path,
                "version": snap.config_version,
                "digest": snap.config_digest,
                "reloads": snap.config_reloads,
                "rejected": snap.config_rejected,
                "last_reload_error": snap.last_reload_error,
            },
        )

    async def _get_route(self, request: Request) -> Response:
        params = query_params(request.query)
        dcid_hex = single_param(params, "dcid")
        service = single_param(params, "service")
        if dcid_hex is None:
            return error_response(400, "missing dcid=<hex>")
        if not _HEX.fullmatch(dcid_hex):
            return error_response(400, "dcid must be an even number of hex digits")
        dcid = bytes.fromhex(dcid_hex)
        if len(dcid) > MAX_DCID_LEN:
            return error_response(400, f"dcid longer than {MAX_DCID_LEN} bytes")
        if service is not None and not 0 < len(service) <= MAX_SERVICE_NAME_LEN:
            return error_response(400, "malformed service name")
        try:
            answer = self._route(service, dcid)
        except LookupError as exc:
            return error_response(404, exception_message(exc, "not found"))
        except ValueError as exc:
            return error_response(400, exception_message(exc, "bad request"))
        return json_response(200, dict(answer))

    async def _post_reload(self, request: Request) -> Response:
        if self._reload_lock.locked():
            return error_response(409, "a reload is already in progress")
        async with self._reload_lock:
            try:
                result = await self._reload()
            except LbError as exc:
                return json_response(422, {"ok": False, "message": str(exc)})
        return json_response(200 if result.ok else 422, dataclasses.asdict(result))
