"""The admin HTTP API over real loopback connections (acceptance S-7, S-3, S-10)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from lb import CidConfig, decode_server_id, encode_cid
from lb.control.admin_http import (
    MAX_BODY,
    MAX_HEADERS,
    MAX_REQUEST_HEAD,
    PUBLIC_PATHS,
    AdminServer,
    AuthRateLimiter,
    peer_key,
)
from lb.control.snapshot import BackendView, LbSnapshot, ReloadResult, ServiceView
from lb.control.status_page import status_page_html
from lb.core.return_path import ReturnStats
from lb.errors import ConfigError

TOKEN = "s3cret-admin-token_0123456789"
KEY = bytes.fromhex("fdf726a9893ec05c0632d3956680baf0")
CFG = CidConfig(config_id=0, server_id_len=2, nonce_len=6, key=KEY)
SID = b"\x00\x01"
#: Bound on every wait in these tests: a hung server fails the test instead of pinning it.
WAIT = 5.0

Addr = tuple[str, int]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class FakeLb:
    """The callables the admin server is wired to, with a controllable reload."""

    reload_result: ReloadResult = field(
        default_factory=lambda: ReloadResult(ok=True, message="applied", config_version=8, config_digest="d2")
    )
    reload_error: Exception | None = None
    reload_gate: asyncio.Event | None = None
    reload_entered: asyncio.Event | None = None
    reloads: int = 0
    fail_snapshot: bool = False

    def snapshot(self) -> LbSnapshot:
        if self.fail_snapshot:
            raise RuntimeError("boom " + KEY.hex())  # must not reach the client
        return LbSnapshot(
            routers=(),
            return_path=ReturnStats(rx_backend_datagrams=0, tx_to_client=0, tx_client_bytes=0, rejected={}),
            services=(ServiceView("echo", "127.0.0.1:4433", (0,), linkable=False, fallback_backends=1),),
            backends=(
                BackendView(
                    service="echo",
                    server_id=SID.hex(),
                    address="127.0.0.1:4001",
                    state="active",
                    healthy=True,
                    in_fallback=True,
                    tx_datagrams=3,
                    unreachable=0,
                    probes=2,
                    probe_replies=2,
                    last_probe_rtt=0.001,
                ),
            ),
            config_path="/etc/quiclb/lb.toml",
            config_version=7,
            config_digest="d1",
            config_reloads=self.reloads,
            config_rejected=0,
            last_reload_error=None,
            fallback_table_builds=1,
            started_at=1_700_000_000.0,
            pid=1,
        )

    async def reload(self) -> ReloadResult:
        if self.reload_entered is not None:
            self.reload_entered.set()
        if self.reload_gate is not None:
            await self.reload_gate.wait()
        if self.reload_error is not None:
            raise self.reload_error
        self.reloads += 1
        return self.reload_result

    def route(self, service: str | None, dcid: bytes) -> Mapping[str, object]:
        if service not in (None, "echo"):
            raise LookupError(f"no service {service!r}")
        sid = decode_server_id([CFG], dcid)
        if sid is None:
            return {"service": "echo", "routable": False, "backend": None}
        return {"service": "echo", "routable": True, "server_id": sid, "backend": "127.0.0.1:4001"}


def _request_bytes(
    method: str, path: str, token: str | None, headers: Mapping[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _parse_reply(data: bytes) -> Reply:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    lines = head.decode("latin-1").split("\r\n")
    version, status, _phrase = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    assert int(headers["content-length"]) == len(body)
    # aiohttp answers a request it cannot parse as HTTP/1.0 (which closes by default); all else is 1.1.
    assert version in ("HTTP/1.1", "HTTP/1.0"), version
    if version == "HTTP/1.1":
        assert headers["connection"] == "close"
    return Reply(int(status), headers, body)


async def read_raw(addr: Addr, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes (every admin response closes its connection)."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(data)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), WAIT)
        except ConnectionResetError:
            return b""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def send_raw(addr: Addr, data: bytes) -> Reply:
    return _parse_reply(await read_raw(addr, data))


async def request(
    addr: Addr,
    method: str,
    path: str,
    *,
    token: str | None = TOKEN,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
) -> Reply:
    return await send_raw(addr, _request_bytes(method, path, token, headers, body))


Scenario = Callable[[AdminServer, Addr], Awaitable[None]]


def serve(scenario: Scenario, lb: FakeLb | None = None, **kwargs: object) -> AdminServer:
    """Run ``scenario`` against a server on 127.0.0.1, port 0; returns the (closed) server."""
    lb = lb or FakeLb()
    server = AdminServer(
        snapshot=lb.snapshot,
        reload=lb.reload,
        route=lb.route,
        token=kwargs.pop("token", TOKEN),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )

    async def main() -> None:
        addr = await server.start("127.0.0.1", 0)
        assert addr[0] == "127.0.0.1" and addr[1] > 0
        try:
            await asyncio.wait_for(scenario(server, addr), 4 * WAIT)
        finally:
            await asyncio.wait_for(server.close(), WAIT)

    asyncio.run(main())
    return server


# -- authentication ------------------------------------------------------------------


def test_every_route_but_healthz_requires_the_token() -> None:
    """Walks the route table: a route added without authentication fails here (S-7)."""
    assert {"/healthz", "/"} == set(PUBLIC_PATHS)  # liveness, and the status page (static, no data)

    async def scenario(server: AdminServer, addr: Addr) -> None:
        assert {r.path for r in server.routes} >= {
            "/healthz", "/metrics", "/backends", "/services", "/config", "/route", "/reload"
        }
        for route in server.routes:
            if route.path in PUBLIC_PATHS:
                continue
            for method in {route.method, "GET", "POST"}:
                for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
                    reply = await request(addr, method, route.path + "?dcid=00", token=token)
                    assert reply.status == 401, (method, route.path, token)
                    assert reply.headers["www-authenticate"].startswith("Bearer")
                    assert TOKEN not in reply.body.decode()
        # Unknown paths are behind the token too: no route discovery without it.
        assert (await request(addr, "GET", "/nope", token=None)).status == 401

    serve(scenario, rate_limiter=AuthRateLimiter(max_failures=1000))


def test_status_page_is_public_static_and_pinned_by_its_csp() -> None:
    async def scenario(server: AdminServer, addr: Addr) -> None:
        reply = await request(addr, "GET", "/", token=None)
        assert reply.status == 200
        assert reply.headers["content-type"] == "text/html; charset=utf-8"
        assert reply.body == status_page_html()  # the file as shipped: it holds no data
        assert b"127.0.0.1:4001" not in reply.body
        csp = reply.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert "unsafe-inline" not in csp
        script = re.search(rb"<script>(.*?)</script>", reply.body, re.DOTALL)
        assert script is not None
        digest = base64.b64encode(hashlib.sha256(script.group(1)).digest()).decode()
        assert f"'sha256-{digest}'" in csp

    serve(scenario)


def test_the_status_page_ships_as_package_data() -> None:
    """An installed LB reads the page from its package: a wheel without it would answer / with a 500."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "control/status_page.html" in pyproject["tool"]["setuptools"]["package-data"]["lb"]
    assert status_page_html().startswith(b"<!doctype html>")


def test_healthz_needs_no_token() -> None:
    async def scenario(server: AdminServer, addr: Addr) -> None:
        reply = await request(addr, "GET", "/healthz", token=None)
        assert (reply.status, reply.body) == (200, b"ok\n")
        assert reply.headers["content-type"].startswith("text/plain")

    serve(scenario)


def test_authorization_header_forms() -> None:
    async def scenario(server: AdminServer, addr: Addr) -> None:
        ok = await request(addr, "GET", "/config", token=None, headers={"Authorization": f"bearer {TOKEN}"})
        assert ok.status == 200
        basic = await request(addr, "GET", "/config", token=None, headers={"Authorization": f"Basic {TOKEN}"})
        assert basic.status == 401
        empty = await request(addr, "GET", "/config", token=None, headers={"Authorization": "Bearer "})
        assert empty.status == 401
        twice = _request_bytes("GET", "/config", TOKEN, {"Authorization": f"Bearer {TOKEN}"})
        assert (await send_raw(addr, twice)).status == 400

    server = serve(scenario)
    assert server.auth_failures == 2


def test_auth_failures_are_logged_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    presented = "attacker-guess-0123456789"
    dcid = encode_cid(CFG, SID, bytes(6)).hex()

    async def scenario(server: AdminServer, addr: Addr) -> None:
        assert (await request(addr, "GET", f"/route?dcid={dcid}", token=presented)).status == 401
        assert (await request(addr, "GET", "/metrics", token=None)).status == 401

    with caplog.at_level(logging.WARNING, logger="lb.control.admin_http"):
        server = serve(scenario)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert server.auth_failures == 2
    assert presented not in caplog.text
    assert TOKEN not in caplog.text
    assert dcid not in caplog.text  # S-10: no full CID next to the client address
    assert "127.0.0.1" in caplog.text


def test_failures_are_rate_limited_per_peer_but_the_right_token_is_served() -> None:
    """Issue 12, item 13: the lockout after 10 bad tokens must not lock out the right token."""
    now = [1000.0]
    limiter = AuthRateLimiter(max_failures=10, window=10.0, lockout=60.0)

    async def scenario(server: AdminServer, addr: Addr) -> None:
        for _ in range(10):
            assert (await request(addr, "GET", "/config", token="guess")).status == 401
            now[0] += 0.5
        locked = await request(addr, "GET", "/config", token="guess")
        assert locked.status == 429
        assert 0 < int(locked.headers["retry-after"]) <= 60
        assert (await request(addr, "GET", "/config", token=None)).status == 429
        assert (await request(addr, "GET", "/config")).status == 200  # the right token, same peer
        assert (await request(addr, "GET", "/healthz", token=None)).status == 200
        metrics = await request(addr, "GET", "/metrics")
        assert metrics.status == 200
        families = {f.name: f for f in text_string_to_metric_families(metrics.body.decode())}
        assert families["quiclb_admin_auth_failures"].samples[0].value == 12
        now[0] += 61
        assert (await request(addr, "GET", "/config", token="guess")).status == 401  # lockout over

    server = serve(scenario, rate_limiter=limiter, clock=lambda: now[0])
    assert server.auth_failures == 13


def test_failures_outside_the_window_do_not_lock() -> None:
    limiter = AuthRateLimiter(max_failures=3, window=10.0, lockout=60.0)
    for t in (0.0, 6.0, 12.0, 18.0, 24.0):  # never 3 within 10 s
        assert limiter.record_failure("p", t) is False
        assert limiter.retry_after("p", t) is None
    assert limiter.record_failure("p", 25.0) is True
    assert limiter.retry_after("p", 25.0) == 60.0
    assert limiter.retry_after("q", 25.0) is None


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = AuthRateLimiter(max_failures=2, window=10.0, lockout=60.0, max_peers=4)
    for i in range(1000):
        limiter.record_failure(f"192.0.2.{i % 256}.{i}", float(i))
    assert len(limiter) == 4


def test_peer_key_groups_ipv6_by_64() -> None:
    assert peer_key(("127.0.0.1", 5000)) == "127.0.0.1"
    assert peer_key(("::ffff:192.0.2.1", 5000, 0, 0)) == "192.0.2.1"
    assert peer_key(("2001:db8::1", 1, 0, 0)) == peer_key(("2001:db8::ffff:2", 2, 0, 0)) == "2001:db8::/64"
    assert peer_key(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"
    assert peer_key("") == peer_key(None) == "local"


@pytest.mark.parametrize("token", [None, "", "has space", "tab\there", "non-ascii-é"])
def test_a_valid_token_is_required(token: str | None) -> None:
    lb = FakeLb()
    with pytest.raises(ValueError, match="token"):
        AdminServer(snapshot=lb.snapshot, reload=lb.reload, route=lb.route, token=token)


# -- read-only routes ------------------------------------------------------------------


def test_metrics_route() -> None:
    async def scenario(server: AdminServer, addr: Addr) -> None:
        reply = await request(addr, "GET", "/metrics")
        assert reply.status == 200
        assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        names = {f.name for f in text_string_to_metric_families(reply.body.decode())}
        assert {"quiclb_config_version", "quiclb_admin_auth_failures", "quiclb_tx_to_backend"} <= names

    serve(scenario)


def test_metrics_route_negotiates_openmetrics() -> None:
    async def scenario(server: AdminServer, addr: Addr) -> None:
        accept = "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        reply = await request(addr, "GET", "/metrics", headers={"Accept": accept})  # what Prometheus sends
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        names = {f.name for f in parse_openmetrics(reply.body.decode())}
        assert {"quiclb_config_version", "quiclb_admin_auth_failures", "quiclb_tx_to_backend"} <= names

    serve(scenario)


def test_backends_services_and_config_routes() -> None:
    async def scenario(server: AdminServer, addr: Addr) -> None:
        backends = await request(addr, "GET", "/backends")
        assert backends.status == 200
        assert backends.headers["content-type"] == "application/json"
        assert backends.json() == [
            {
                "service": "echo",
                "server_id": "0001",
                "address": "127.0.0.1:4001",
                "state": "active",
                "healthy": True,
                "in_fallback": True,
                "tx_datagrams": 3,
                "unreachable": 0,
                "probes": 2,
                "probe_replies": 2,
                "last_probe_rtt": 0.001,
                "stale_cid_replies": 0,
                "stale_config": False,
            }
        ]
        services = await request(addr, "GET", "/services")
        assert services.json() == [
            {"name": "echo", "vip": "127.0.0.1:4433", "config_ids": [0], "linkable": False, "fallback_backends": 1}
        ]
        config = await request(addr, "GET", "/config")
        assert config.json() == {
            "path": "/etc/quiclb/lb.toml",
            "version": 7,
            "digest": "d1",
            "reloads": 0,
            "rejected": 0,
            "last_reload_error": None,
        }

    serve(scenario)


def test_route_lookup() -> None:
    dcid = encode_cid(CFG, SID, bytes.fromhex("0a0b0c0d0e0f")).hex()

    async def scenario(server: AdminServer, addr: Addr) -> None:
        ok = await request(addr, "GET", f"/route?dcid={dcid}")
        assert ok.status == 200
        assert ok.json() == {"service": "echo", "routable": True, "server_id": "0001", "backend": "127.0.0.1:4001"}
        upper = await request(addr, "GET", f"/route?dcid={dcid.upper()}&service=echo")
        assert upper.json() == ok.json()
        unroutable = await request(addr, "GET", "/route?dcid=" + "ff" * 9)
        assert unroutable.status == 200 and unroutable.json()["routable"] is False  # type: ignore[index]
        for bad in ("zz", "abc", "", "00" * 21, "0x0102"):
            reply = await request(addr, "GET", f"/route?dcid={bad}")
            assert reply.status == 400, bad
            assert "error" in reply.json()  # type: ignore[operator]
        assert (await request(addr, "GET", "/route")).status == 400
        assert (await request(addr, "GET", f"/route?dcid={dcid}&dcid={dcid}")).status == 400
        missing = await request(addr, "GET", f"/route?dcid={dcid}&service=nope")
        assert missing.status == 404
        assert missing.json() == {"error": "no service 'nope'"}

    serve(scenario)


# -- reload and methods ----------------------------------------------------------------


def test_reload_success_and_rejection() -> None:
    lb = FakeLb()

    async def scenario(server: AdminServer, addr: Addr) -> None:
        ok = await request(addr, "POST", "/reload")
        assert ok.status == 200
        assert ok.json() == {"ok": True, "message": "applied", "config_version": 8, "config_digest": "d2"}
        assert lb.reloads == 1
        lb.reload_result = ReloadResult(ok=False, message="lb.toml: services[0].vip: bad", config_version=8,
                                        config_digest="d2")
        rejected = await request(addr, "POST", "/reload")
        assert rejected.status == 422
        assert rejected.json()["message"] == "lb.toml: services[0].vip: bad"  # type: ignore[index]
        lb.reload_error = ConfigError("lb.toml: unreadable")
        raised = await request(addr, "POST", "/reload")
        assert raised.status == 422
        assert raised.json() == {"ok": False, "message": "lb.toml: unreadable"}
        with_body = await request(addr, "POST", "/reload", body=b"{}")  # a small body is drained and ignored
        assert with_body.status == 422

    serve(scenario, lb)


def test_concurrent_reload_is_409() -> None:
    lb = FakeLb()

    async def scenario(server: AdminServer, addr: Addr) -> None:
        lb.reload_gate = asyncio.Event()
        lb.reload_entered = asyncio.Event()
        first = asyncio.create_task(request(addr, "POST", "/reload"))
        await asyncio.wait_for(lb.reload_entered.wait(), WAIT)
        second = await request(addr, "POST", "/reload")
        assert second.status == 409
        lb.reload_gate.set()
        assert (await first).status == 200

    serve(scenario, lb)


def test_methods_and_unknown_paths() -> None:
    async def scenario(server: AdminServer, addr: Addr) -> None:
        get_reload = await request(addr, "GET", "/reload")
        assert get_reload.status == 405
        assert get_reload.headers["allow"] == "POST"
        for route in server.routes:
            other = "POST" if route.method == "GET" else "GET"
            reply = await request(addr, other, route.path)
            assert reply.status == 405, route.path
            assert reply.headers["allow"] == route.method
        assert (await request(addr, "DELETE", "/backends")).status == 405
        assert (await request(addr, "GET", "/nope")).status == 404
        assert (await request(addr, "GET", "/metrics/")).status == 404
        assert (await request(addr, "GET", "/%6detrics")).status == 404  # no percent-decoding

    serve(scenario)


def test_handler_errors_are_500_without_details() -> None:
    lb = FakeLb(fail_snapshot=True)

    async def scenario(server: AdminServer, addr: Addr) -> None:
        reply = await request(addr, "GET", "/backends")
        assert reply.status == 500
        assert KEY.hex() not in reply.body.decode()
        assert (await request(addr, "GET", "/healthz", token=None)).status == 200

    serve(scenario, lb)


# -- hostile clients ---------------------------------------------------------------------


H = b"Host: 127.0.0.1\r\n"  # HTTP/1.1 requires Host (RFC 9112 §3.2): without it aiohttp answers 400 first


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /healthz\r\n\r\n", None),  # HTTP/0.9: no status line would be truthful
        (b"GET  /healthz HTTP/1.1\r\n" + H + b"\r\n", 200),  # RFC 9112 §3 lets a parser split on whitespace
        (b"get /healthz HTTP/1.1\r\n" + H + b"\r\n", 400),
        (b"GET healthz HTTP/1.1\r\n" + H + b"\r\n", 400),
        (b"GET /healthz HTTP/2.0\r\n" + H + b"\r\n", None),
        (b"GET /h\xffz HTTP/1.1\r\n" + H + b"\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n" + H + b"No-Colon\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n" + H + b"Bad Name: x\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
        (b"GET /healthz HTTP/1.1\r\n" + H + H + b"\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
        (b"POST /reload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (f"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode(), 413),
        (b"GET /healthz HTTP/1.1\r\n" + H + b"X-A: b\r\n" * MAX_HEADERS + b"\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * (MAX_REQUEST_HEAD + 100) + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * (16 * MAX_REQUEST_HEAD) + b"\r\n\r\n", 431),
        (b"GET /route?" + b"&".join(b"a%d=1" % i for i in range(40)) + b" HTTP/1.1\r\n" + H + b"\r\n", 401),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), 400),  # a TLS ClientHello
        (b"GET /config HTTP/1.1\r\n" + H + b"Authorization: Bearer \xe6\x97\xa5\xff\r\n\r\n", 401),
    ],
    ids=[
        "no-version", "double-space", "lower-method", "no-slash", "http2", "non-ascii", "no-colon",
        "space-in-name", "negative-length", "repeated-length", "repeated-host", "no-host", "chunked",
        "large-body", "many-headers", "huge-head", "enormous-head", "many-query-fields-needs-auth-first", "tls",
        "non-ascii-token",
    ],
)
def test_malformed_requests(raw: bytes, status: int | None) -> None:
    """A clean 4xx, or a closed connection (``None``), never a hang: the read is bounded by WAIT."""

    async def scenario(server: AdminServer, addr: Addr) -> None:
        data = await read_raw(addr, raw)
        if status is None:
            assert data == b""
        else:
            assert _parse_reply(data).status == status

    serve(scenario)


def test_too_many_query_fields_with_token() -> None:
    query = "&".join(f"a{i}=1" for i in range(40))

    async def scenario(server: AdminServer, addr: Addr) -> None:
        assert (await request(addr, "GET", f"/route?{query}")).status == 400

    serve(scenario)


def test_slow_client_gets_408() -> None:
    async def scenario(server: AdminServer, addr: Addr) -> None:
        reader, writer = await asyncio.open_connection(*addr)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
            await writer.drain()
            reply = _parse_reply(await asyncio.wait_for(reader.read(), WAIT))
        finally:
            writer.close()
            await writer.wait_closed()
        assert reply.status == 408
        metrics = await request(addr, "GET", "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(metrics.body.decode())}
        assert families["quiclb_admin_head_timeouts"].samples[0].value == 1

    serve(scenario, read_timeout=0.2)


def test_body_that_never_arrives_gets_408() -> None:
    async def scenario(server: AdminServer, addr: Addr) -> None:
        reply = await send_raw(addr, _request_bytes("POST", "/reload", TOKEN, {"Content-Length": "10"}))
        assert reply.status == 408

    serve(scenario, read_timeout=0.2)


def test_close_abandons_idle_connections() -> None:
    async def scenario(server: AdminServer, addr: Addr) -> None:
        reader, writer = await asyncio.open_connection(*addr)
        try:
            # Make sure the server has accepted the connection before closing.
            reply = await request(addr, "GET", "/healthz", token=None)
            assert reply.status == 200
            await asyncio.wait_for(server.close(), WAIT)
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
        finally:
            writer.close()
            await writer.wait_closed()

    serve(scenario, read_timeout=60.0)


def test_start_twice_is_an_error() -> None:
    async def scenario(server: AdminServer, addr: Addr) -> None:
        with pytest.raises(RuntimeError):
            await server.start("127.0.0.1", 0)

    serve(scenario)


# -- S-3 ---------------------------------------------------------------------------------


def test_no_key_material_in_any_route() -> None:
    dcid = encode_cid(CFG, SID, bytes(6)).hex()
    bodies: list[str] = []

    async def scenario(server: AdminServer, addr: Addr) -> None:
        for route in server.routes:
            path = route.path + (f"?dcid={dcid}" if route.path == "/route" else "")
            reply = await request(addr, route.method, path)
            assert reply.status == 200, route.path
            bodies.append(reply.body.decode())
            bodies.extend(f"{k}: {v}" for k, v in reply.headers.items())

    serve(scenario)
    text = "\n".join(bodies)
    for form in (KEY.hex(), KEY.hex().upper(), ":".join(f"{b:02x}" for b in KEY), TOKEN):
        assert form not in text


def test_healthz_answers_503_draining_while_the_lb_drains() -> None:
    draining = [False]

    async def scenario(server: AdminServer, addr: Addr) -> None:
        assert (await request(addr, "GET", "/healthz", token=None)).status == 200
        draining[0] = True
        reply = await request(addr, "GET", "/healthz", token=None)
        assert (reply.status, reply.body) == (503, b"draining\n")

    serve(scenario, draining=lambda: draining[0])
