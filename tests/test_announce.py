"""``quiclb announce``: the rise/fall rules, the birdc calls, and the health poll."""

from __future__ import annotations

import http.server
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lb.announce import Announcer, AnnounceSettings, probe
from lb.cli import main

FAKE_BIRDC = (sys.executable, "-c", "import sys; print(sys.argv[1] + 'd')")  # prints "enabled"/"disabled"


def settings(**kwargs: object) -> AnnounceSettings:
    base: dict[str, object] = {"healthz": "http://127.0.0.1:1/healthz", "protocol": "quiclb_vip",
                               "birdc": FAKE_BIRDC, "rise": 2, "fall": 3}
    base.update(kwargs)
    return AnnounceSettings(**base)  # type: ignore[arg-type]


def test_announce_after_rise_oks_and_withdraw_after_fall_failures() -> None:
    a = Announcer(settings())
    assert a.observe("ok") is None  # one ok is not enough
    assert a.observe("ok") is True
    assert a.apply(True, "test") and a.announced is True
    assert a.observe("ok") is None  # already announced
    assert [a.observe("down"), a.observe("down")] == [None, None]
    assert a.observe("ok") is None  # a success resets the failure count
    assert [a.observe("down"), a.observe("down"), a.observe("down")] == [None, None, False]
    assert a.apply(False, "test") and a.announced is False
    assert a.observe("down") is None


def test_draining_withdraws_at_once() -> None:
    a = Announcer(settings())
    a.observe("ok")
    a.observe("ok")
    a.apply(True, "test")
    assert a.observe("draining") is False


def test_a_failed_birdc_call_leaves_the_state_unknown_so_it_is_retried() -> None:
    a = Announcer(settings(birdc=(sys.executable, "-c", "import sys; print('syntax error'); sys.exit(1)")))
    assert not a.apply(True, "test")
    assert a.announced is None


@contextmanager
def health_server(status: int) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"ok\n" if status == 200 else b"draining\n")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/healthz"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "verdict"), [(200, "ok"), (503, "draining"), (500, "down")])
def test_probe_reads_the_health_endpoint(status: int, verdict: str) -> None:
    with health_server(status) as url:
        assert probe(url, 2.0) == verdict


def test_probe_of_a_dead_lb_is_down() -> None:
    assert probe("http://127.0.0.1:1/healthz", 0.5) == "down"


@pytest.mark.parametrize("flags", [
    ["--probe-source", "not-an-ip"],
    ["--probe-source", "0.0.0.0"],
    ["--probe-source", "10.0.0.1", "--probe-source", "10.0.0.2"],
    ["--drain-quiet", "0"],
    ["--drain-quiet", "10", "--drain-timeout", "5"],
])
def test_run_refuses_bad_scaleout_flags(flags: list[str], tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path  # noqa: PLC0415

    from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec  # noqa: PLC0415

    dep = Deployment(Path(str(tmp_path)), [ServiceSpec(backends=[BackendSpec("0001")])])
    dep.write()
    assert main(["run", "-c", str(dep.path), *flags]) == 2
    assert "quiclb: error:" in capsys.readouterr().err


def test_announce_refuses_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["announce", "--healthz", "http://127.0.0.1:1/healthz", "--rise", "0"]) == 2
    assert "quiclb: error:" in capsys.readouterr().err
