"""The admin HTTP API: health, metrics, read-only views, a CID lookup and reload (acceptance S-7).

A deliberately small HTTP/1.1 server on :func:`asyncio.start_server`: one
request per connection, ``Connection: close``, no framework.

Rules:

- **One table.** Every route is a :class:`Route` in :attr:`AdminServer.routes`.
  Authentication is not a property of a route: :meth:`AdminServer._dispatch`
  demands the bearer token for every path outside :data:`PUBLIC_PATHS`
  (``/healthz`` only) *before* it looks the path up, so a new route — or an
  unknown path — can never skip it. A test walks the table to prove it.
- **Bearer token**, compared with :func:`hmac.compare_digest`. Missing or wrong:
  401 with ``WWW-Authenticate: Bearer``, counted in :attr:`AdminServer.auth_failures`
  and logged at WARNING with the peer, method and path — never the presented
  token, never the query string (which may carry a full CID, S-10).
- **Rate limit.** :class:`AuthRateLimiter`: ``max_failures`` failures within
  ``window`` seconds lock the peer (an IPv4 address or an IPv6 /64) out for
  ``lockout`` seconds: 429 with ``Retry-After``, even with the right token.
  Its memory is bounded (least recently failing peers are forgotten first).
- **Mutations are POST only.** A path served with another method answers 405
  with ``Allow``; ``GET /reload`` is 405.
- **Slow or large clients cannot pin the server.** The request head and body
  must arrive within ``read_timeout`` (else 408), the head is at most
  :data:`MAX_REQUEST_HEAD` bytes (431), a body at most :data:`MAX_BODY` (413),
  chunked bodies are refused (501), writes give up after ``write_timeout``,
  and at most :data:`MAX_CONNECTIONS` are served at once (503 beyond).
- **No key material.** Views come from :class:`~lb.control.snapshot.LbSnapshot`,
  which holds counters, names and digests only (S-3).

Binding policy (loopback unless ``admin_bind_any``) is enforced by the
configuration (``lb.control.config``); this server requires a token always.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import http
import ipaddress
import json
import logging
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lb.control.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from lb.control.metrics import render_metrics
from lb.control.snapshot import LbSnapshot, ReloadResult
from lb.errors import LbError

logger = logging.getLogger(__name__)

#: Largest request line plus headers, in bytes.
MAX_REQUEST_HEAD = 8192
#: Most header lines in one request.
MAX_HEADERS = 64
#: Largest request body, in bytes (no route reads one; it is drained and ignored).
MAX_BODY = 1024
#: Most connections served at once; more are answered 503 and closed.
MAX_CONNECTIONS = 64
#: Longest DCID /route accepts: the QUIC v1 limit (RFC 9000 §17.2).
MAX_DCID_LEN = 20
#: Longest ``service`` query value.
MAX_SERVICE_NAME_LEN = 128
#: Most query fields parsed from one request target.
MAX_QUERY_FIELDS = 16
DEFAULT_READ_TIMEOUT = 5.0
DEFAULT_WRITE_TIMEOUT = 5.0

#: The only paths served without the bearer token.
PUBLIC_PATHS = frozenset({"/healthz"})

JSON_CONTENT_TYPE = "application/json"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"

_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_DIGITS = re.compile(r"[0-9]{1,10}")
_METHOD = re.compile(r"[A-Z]{1,16}")
# Request header field names are RFC 9110 tokens; no whitespace before the colon (RFC 9112 §5.1).
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A repeated header among these is ambiguous, so the request is refused.
_SINGLETON_HEADERS = frozenset({"authorization", "content-length", "transfer-encoding", "host"})


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # not percent-decoded: only exact matches route anywhere
    query: str  # raw; parsed by the routes that take parameters, after authentication
    headers: Mapping[str, str]  # lower-case names; latin-1 values
    peer: str  # rate-limit key: IPv4 address, IPv6 /64, or "local"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON_CONTENT_TYPE
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """One entry of the route table: exactly one method per path."""

    method: str
    path: str
    handler: Handler
    summary: str


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_default(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_response(status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    body = json.dumps(payload, default=_json_default, separators=(",", ":")).encode("utf-8") + b"\n"
    return Response(status, body, JSON_CONTENT_TYPE, headers)


def error_response(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return json_response(status, {"error": message}, headers)


def peer_key(peername: object) -> str:
    """The rate-limit identity of a peer: IPv4 address, IPv6 /64 prefix, or ``"local"``.

    An IPv6 host usually owns its whole /64, so keying single addresses would
    let one client rotate through them.
    """
    if not isinstance(peername, tuple) or not peername:
        return "local"
    host = str(peername[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _PeerFailures:
    times: deque[float]
    locked_until: float = 0.0


class AuthRateLimiter:
    """Locks a peer out after ``max_failures`` auth failures within ``window`` seconds.

    Memory is bounded: at most ``max_peers`` peers of at most ``max_failures``
    timestamps each; the least recently failing peer is forgotten first.
    Time comes in as ``now`` (monotonic seconds).
    """

    def __init__(
        self, *, max_failures: int = 10, window: float = 10.0, lockout: float = 60.0, max_peers: int = 1024
    ) -> None:
        if max_failures < 1 or window <= 0 or lockout <= 0 or max_peers < 1:
            raise ValueError("rate limit: max_failures and max_peers must be >= 1, window and lockout > 0")
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.max_peers = max_peers
        self._peers: OrderedDict[str, _PeerFailures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def retry_after(self, peer: str, now: float) -> float | None:
        """Seconds left in ``peer``'s lockout, or ``None`` when it may try."""
        state = self._peers.get(peer)
        if state is None or state.locked_until <= now:
            return None
        return state.locked_until - now

    def record_failure(self, peer: str, now: float) -> bool:
        """Count one failure; ``True`` when it starts a lockout."""
        state = self._peers.get(peer)
        if state is None:
            if len(self._peers) >= self.max_peers:
                self._peers.popitem(last=False)
            state = _PeerFailures(deque(maxlen=self.max_failures))
            self._peers[peer] = state
        else:
            self._peers.move_to_end(peer)
        times = state.times
        while times and times[0] <= now - self.window:
            times.popleft()
        times.append(now)
        if len(times) >= self.max_failures:
            times.clear()
            state.locked_until = now + self.lockout
            return True
        return False


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
    ) -> None:
        self._token = b""
        self.set_token(token)
        self._snapshot = snapshot
        self._reload = reload
        self._route = route
        self._limiter = rate_limiter if rate_limiter is not None else AuthRateLimiter()
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._clock = clock
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()
        #: Requests refused for a missing or wrong token, or while locked out (monotonic).
        self.auth_failures = 0
        self.routes: tuple[Route, ...] = (
            Route("GET", "/healthz", self._get_healthz, "liveness; no token"),
            Route("GET", "/metrics", self._get_metrics, "Prometheus text 0.0.4"),
            Route("GET", "/backends", self._get_backends, "backends with state and counters"),
            Route("GET", "/services", self._get_services, "services (VIP, configs, linkable)"),
            Route("GET", "/config", self._get_config, "running configuration identity"),
            Route("GET", "/route", self._get_route, "which backend owns ?dcid=<hex>[&service=<name>]"),
            Route("POST", "/reload", self._post_reload, "reload the configuration file"),
        )
        self._by_path = {r.path: r for r in self.routes}
        if len(self._by_path) != len(self.routes):
            raise ValueError("admin routes: one method per path")

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
        if self._server is not None:
            raise RuntimeError("admin server already started")
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_HEAD)
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def close(self) -> None:
        """Stop listening and abandon connections in progress."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    # -- connection handling ------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            response = await self._respond(reader, writer)
            if response is not None:
                await self._send(writer, response)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            logger.exception("admin: unexpected error serving a connection")
        finally:
            self._tasks.discard(task)
            await self._close_writer(writer)

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Response | None:
        if len(self._tasks) > MAX_CONNECTIONS:
            return error_response(503, "too many admin connections")
        peer = peer_key(writer.get_extra_info("peername"))
        try:
            async with asyncio.timeout(self._read_timeout):
                request = await self._read_request(reader, peer)
        except TimeoutError:
            return error_response(408, "request not received in time")
        except _HttpError as exc:
            return error_response(exc.status, exc.message)
        except asyncio.IncompleteReadError:
            return None  # the client went away mid-request
        return await self._dispatch(request)

    async def _read_request(self, reader: asyncio.StreamReader, peer: str) -> Request:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _HttpError(431, f"request head exceeds {MAX_REQUEST_HEAD} bytes") from None
        except ValueError:  # separator found, but beyond the limit
            raise _HttpError(431, f"request head exceeds {MAX_REQUEST_HEAD} bytes") from None
        lines = head[:-4].split(b"\r\n")
        if len(lines) - 1 > MAX_HEADERS:
            raise _HttpError(431, f"more than {MAX_HEADERS} header fields")
        try:
            method, target, version = lines[0].decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            raise _HttpError(400, "malformed request line") from None
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _HttpError(505, "HTTP/1.1 only")
        if not _METHOD.fullmatch(method) or not target.startswith("/"):
            raise _HttpError(400, "malformed request line")
        headers = _parse_headers(lines[1:])
        if "transfer-encoding" in headers:
            raise _HttpError(501, "chunked request bodies are not supported")
        length_text = headers.get("content-length", "0")
        if not _DIGITS.fullmatch(length_text):
            raise _HttpError(400, "malformed Content-Length")
        length = int(length_text)
        if length > MAX_BODY:
            raise _HttpError(413, f"request body exceeds {MAX_BODY} bytes")
        if length:
            await reader.readexactly(length)  # drained and ignored: no route takes a body
        split = urlsplit(target)
        return Request(method, split.path, split.query, headers, peer)

    async def _send(self, writer: asyncio.StreamWriter, response: Response) -> None:
        status = response.status
        phrase = http.HTTPStatus(status).phrase
        head = [
            f"HTTP/1.1 {status} {phrase}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
        ]
        head.extend(f"{name}: {value}" for name, value in response.headers)
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
        try:
            async with asyncio.timeout(self._write_timeout):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()  # the client does not read: drop the buffer

    async def _close_writer(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(self._write_timeout):
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()
        except (ConnectionError, OSError):
            pass

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
        except _HttpError as exc:
            return error_response(exc.status, exc.message)
        except Exception:
            logger.exception("admin: %s %s failed", route.method, route.path)
            return error_response(500, "internal error; see the LB log")

    def _authorize(self, request: Request) -> Response | None:
        """``None`` when the request carries the token; otherwise the 401 or 429 to send."""
        now = self._clock()
        wait = self._limiter.retry_after(request.peer, now)
        if wait is not None:
            self.auth_failures += 1
            return error_response(429, "too many failed attempts", (("Retry-After", str(math.ceil(wait))),))
        header = request.headers.get("authorization")
        presented = _bearer_token(header)
        if presented is not None and hmac.compare_digest(presented.encode("latin-1"), self._token):
            return None
        self.auth_failures += 1
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
                "admin: %s locked out for %.0f s after %d failures within %.0f s",
                request.peer,
                self._limiter.lockout,
                self._limiter.max_failures,
                self._limiter.window,
            )
        return error_response(401, "bearer token required", (("WWW-Authenticate", 'Bearer realm="quiclb"'),))

    # -- handlers -----------------------------------------------------------------

    async def _get_healthz(self, request: Request) -> Response:
        return Response(200, b"ok\n", TEXT_CONTENT_TYPE)

    async def _get_metrics(self, request: Request) -> Response:
        text = render_metrics(self._snapshot(), admin_auth_failures=self.auth_failures)
        return Response(200, text.encode("utf-8"), METRICS_CONTENT_TYPE)

    async def _get_backends(self, request: Request) -> Response:
        return json_response(200, [dataclasses.asdict(b) for b in self._snapshot().backends])

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
        params = _query_params(request.query)
        dcid_hex = _single_param(params, "dcid")
        service = _single_param(params, "service")
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
            return error_response(404, _message(exc, "not found"))
        except ValueError as exc:
            return error_response(400, _message(exc, "bad request"))
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


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _FIELD_NAME.fullmatch(name):
            raise _HttpError(400, "malformed header field")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in _SINGLETON_HEADERS:
                raise _HttpError(400, f"repeated {key} header")
            headers[key] += ", " + text
        else:
            headers[key] = text
    return headers


def _bearer_token(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, credentials = header.partition(" ")
    credentials = credentials.strip(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials


def _query_params(query: str) -> dict[str, list[str]]:
    try:
        return parse_qs(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise _HttpError(400, "malformed query string") from None


def _single_param(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise _HttpError(400, f"{name} given more than once")
    return values[0]


def _message(exc: Exception, default: str) -> str:
    if exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    return default
