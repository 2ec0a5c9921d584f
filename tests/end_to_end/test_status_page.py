"""The status page in a real browser: headless Chromium against a running LB and backends (issue 11).

The test looks at what a person sees — the visible text of the page — after
typing the admin token: the backends listed and healthy, then one of them
turning unhealthy when it is killed, then a reload listed and a rejected one
flagged. Screenshots of those moments are kept in ``tests/artifacts/`` (or
``$QUICLB_TEST_ARTIFACTS``).

Chromium is driven over the DevTools protocol with aiohttp's websocket client:
no driver binary, no npm.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lb import CidConfig, encode_cid
from lb.control.admin_http import AdminServer
from lb.control.snapshot import BackendView, LbSnapshot, ReloadResult, ServiceView
from lb.core.return_path import ReturnStats
from quiclb_harness.admin_client import admin_request
from quiclb_harness.datagrams import short_header

from .conftest import make_udp_cluster

ARTIFACTS = Path(os.environ.get("QUICLB_TEST_ARTIFACTS", Path(__file__).parents[1] / "artifacts"))
#: Bound on each wait for the page to show something.
PAGE_WAIT = 20.0
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class Browser:
    """One headless Chromium process and a DevTools session on its first tab."""

    def __init__(self, profile: Path) -> None:
        binary = next((b for b in map(shutil.which, BROWSERS) if b), None)
        if binary is None:
            pytest.fail("no Chromium found: `make install` installs the Debian package `chromium` (as root)")
        self.profile = profile
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--no-default-browser-check", "--window-size=1400,1200",
             f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def connect(self) -> None:
        port_file = self.profile / "DevToolsActivePort"  # Chromium writes its chosen port here
        async with asyncio.timeout(PAGE_WAIT):
            while not (port_file.exists() and port_file.read_text().strip()):
                assert self.proc.poll() is None, "chromium exited"
                await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        call_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        async with asyncio.timeout(PAGE_WAIT):
            while True:
                message = json.loads((await self._ws.receive()).data)
                if message.get("id") == call_id:  # events in between are not needed
                    assert "error" not in message, message
                    return dict(message.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for_text(self, selector: str, predicate: Any, what: str) -> str:
        """Poll the visible text of ``selector`` until ``predicate(text)``; returns it."""
        deadline = time.monotonic() + PAGE_WAIT
        text = ""
        while time.monotonic() < deadline:
            text = await self.evaluate(f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''")
            if predicate(text):
                return str(text)
            await asyncio.sleep(0.1)
        raise AssertionError(f"{what}: not shown within {PAGE_WAIT} s; {selector} shows:\n{text}")

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self.proc.kill()  # by PID: the process this test started
        self.proc.wait(timeout=10)


def backend_rows(text: str) -> dict[str, str]:
    """Rows of the backends table, by server ID (the second column)."""
    rows = {}
    for line in text.splitlines()[1:]:
        cells = line.split("\t")
        if len(cells) > 3:
            rows[cells[1].strip()] = line
    return rows


def test_status_page_shows_backends_and_one_turning_unhealthy(tmp_path: Path) -> None:
    cluster = make_udp_cluster(tmp_path, n=3)
    try:
        lb = cluster.start_lb()
        host, port = cluster.admin(lb)
        cfg = CidConfig(0, 2, 14, cluster.dep.key("echo", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for sid in cluster.backends:
                client.sendto(short_header(encode_cid(cfg, bytes.fromhex(sid), os.urandom(14))), cluster.dep.vip())
        for backend in cluster.backends.values():
            backend.wait_for(1)
        url = f"http://{host}:{port}/?refresh=300"
        asyncio.run(drive_page(url, cluster.dep.token, cluster, tmp_path, (host, port)))
    finally:
        cluster.close()


async def drive_page(url: str, token: str, cluster: Any, tmp_path: Path, admin: tuple[str, int]) -> None:
    browser = Browser(tmp_path / "chromium-profile")
    try:
        await browser.connect()
        await browser.send("Page.navigate", url=url)
        await browser.wait_for_text("body", lambda t: "Admin token" in t, "the token prompt")
        # The page itself holds no data: before the token, no backend is named anywhere.
        page = await browser.evaluate("document.documentElement.outerHTML")
        assert not any(sid in page for sid in cluster.backends), "the page embeds data"

        await browser.evaluate("document.querySelector('#token').focus()")
        await browser.send("Input.insertText", text=token)
        await browser.evaluate("document.querySelector('#connect').click()")

        text = await browser.wait_for_text(
            "#backends",
            lambda t: len(backend_rows(t)) == 3 and all("healthy" in r and "up" in r for r in backend_rows(t).values()),
            "three healthy backends",
        )
        assert "unhealthy" not in text
        services = await browser.wait_for_text("#services", lambda t: "echo" in t, "the service")
        assert cluster.dep.vip()[0] in services
        outcomes = await browser.wait_for_text("#outcomes", lambda t: "cid_routed" in t, "the outcome counters")
        assert "received" in outcomes and "unknown_sid_dropped" in outcomes
        await browser.wait_for_text("#configs", lambda t: all(s in t for s in cluster.backends), "per-config traffic")
        await browser.screenshot(ARTIFACTS / "status-page-healthy.png")

        victim = sorted(cluster.backends)[1]
        cluster.backends[victim].close()  # it stops answering the LB's health probes
        text = await browser.wait_for_text(
            "#backends", lambda t: "unhealthy" in backend_rows(t).get(victim, ""), f"backend {victim} unhealthy"
        )
        rows = backend_rows(text)
        assert "DOWN" in rows[victim]
        assert all("unhealthy" not in row for sid, row in rows.items() if sid != victim)
        await browser.screenshot(ARTIFACTS / "status-page-backend-down.png")

        # Reloads: an applied one is listed with its version, a rejected one raises a banner.
        cluster.dep.version = 2
        cluster.dep.write()
        assert (await asyncio.to_thread(admin_request, admin, "POST", "/reload", token))[0] == 200
        await browser.wait_for_text("#reloads", lambda t: "applied: v2" in t, "the applied reload")
        cluster.dep.path.write_text("[lb\n")  # not TOML
        assert (await asyncio.to_thread(admin_request, admin, "POST", "/reload", token))[0] == 422
        banner = await browser.wait_for_text("#alerts", lambda t: "reload rejected" in t, "the rejected reload")
        assert "lb.toml" in banner
        await browser.screenshot(ARTIFACTS / "status-page-reload-rejected.png")
    finally:
        await browser.close()


def _alarming_snapshot() -> LbSnapshot:
    """A backend minting CIDs the LB cannot decode, a plaintext service, a rejected reload."""
    stale = BackendView(
        service="web", server_id="00000000000000a1", address="10.0.0.7:5001", state="active", healthy=True,
        in_fallback=True, tx_datagrams=12, unreachable=0, probes=4, probe_replies=4, last_probe_rtt=0.0002,
        stale_cid_replies=5, stale_config=True,
    )
    return LbSnapshot(
        routers=(), return_path=ReturnStats(rx_backend_datagrams=0, tx_to_client=0, tx_client_bytes=0, rejected={}),
        services=(ServiceView("web", "192.0.2.1:443", (0,), linkable=True, fallback_backends=1),),
        backends=(stale,), config_path="/etc/quiclb/lb.toml", config_version=3, config_digest="ab" * 32,
        config_reloads=2, config_rejected=1, last_reload_error="lb.toml: service[0].vip: bad address",
        fallback_table_builds=1, started_at=1_700_000_000.0, pid=1,
    )


def test_status_page_raises_the_alarms(tmp_path: Path) -> None:
    """stale_config_alert, a linkable service and a rejected reload are banners a person cannot miss."""
    token = "status-page-alarm-token-0123456789"

    async def reload() -> ReloadResult:
        return ReloadResult(ok=True, message="", config_version=3, config_digest="ab" * 32)

    async def scenario() -> None:
        server = AdminServer(snapshot=_alarming_snapshot, reload=reload, route=lambda s, d: {}, token=token)
        host, port = await server.start("127.0.0.1", 0)
        browser = Browser(tmp_path / "chromium-profile")
        try:
            await browser.connect()
            await browser.send("Page.navigate", url=f"http://{host}:{port}/?refresh=300")
            await browser.wait_for_text("body", lambda t: "Admin token" in t, "the token prompt")
            await browser.evaluate("document.querySelector('#token').focus()")
            await browser.send("Input.insertText", text=token)
            await browser.evaluate("document.querySelector('#connect').click()")
            alerts = await browser.wait_for_text("#alerts", lambda t: "stale_config_alert" in t, "the stale alert")
            assert "web/00000000000000a1" in alerts
            assert "last reload rejected: lb.toml: service[0].vip: bad address" in alerts
            assert "plaintext CID configuration is live" in alerts
            row = backend_rows(await browser.wait_for_text("#backends", lambda t: "STALE" in t, "the stale row"))
            assert "STALE" in row["00000000000000a1"]
            await browser.screenshot(ARTIFACTS / "status-page-alarms.png")
        finally:
            await browser.close()
            await server.close()

    asyncio.run(scenario())
