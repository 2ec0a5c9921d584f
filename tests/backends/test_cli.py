"""``quiclb-backend`` as a real process: readiness line, serving, metrics, SIGHUP reload, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backends.cli import main
from backends.client import EchoClient
from lb.control.keys import write_key_file
from lb.core.cid_config import CidConfig
from lb.core.cid_decoder import decode_server_id
from quiclb_harness.loopback_stack import LoopbackLb

KEY_0 = bytes.fromhex("8f95f09245765f80256934e50c66207f")
KEY_1 = bytes.fromhex("0123456789abcdef0123456789abcdef")
CFG_0 = CidConfig(config_id=0, server_id_len=2, nonce_len=14, key=KEY_0)
CFG_1 = CidConfig(config_id=1, server_id_len=2, nonce_len=14, key=KEY_1)
#: Seconds the process may take to print READY (imports, certificate generation).
READY_TIMEOUT = 20.0


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A currently free port: the config format refuses port 0 for backends."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def two_free_udp_ports() -> tuple[int, int]:
    """Two distinct free ports (the first is held while the second is chosen)."""
    held: list[socket.socket] = []
    try:
        return free_udp_port_held(held), free_udp_port_held(held)
    finally:
        for sock in held:
            sock.close()


def free_udp_port_held(held: list[socket.socket]) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    held.append(sock)
    return int(sock.getsockname()[1])


def write_config(path: Path, *, inside: tuple[str, int], vip: tuple[str, int], ports: tuple[int, int],
                 configs: list[tuple[int, int, str]]) -> None:
    """``configs``: (config_id, nonce_len, key file name) in rotation order."""
    cid_tables = "".join(
        f"""
[[service.cid_config]]
config_id = {config_id}
server_id_len = 2
nonce_len = {nonce_len}
key_file = "{key_file}"
"""
        for config_id, nonce_len, key_file in configs
    )
    path.write_text(
        f"""
[lb]
inside = "{inside[0]}:{inside[1]}"
return_mode = "via-lb"

[[service]]
name = "echo"
vip = "{vip[0]}:{vip[1]}"
{cid_tables}
[[service.backend]]
server_id = "0001"
address = "127.0.0.1:{ports[0]}"

[[service.backend]]
server_id = "0002"
address = "127.0.0.1:{ports[1]}"
"""
    )


def make_config(tmp_path: Path, relay: LoopbackLb | None = None) -> Path:
    write_key_file(tmp_path / "k0.key", KEY_0)
    write_key_file(tmp_path / "k1.key", KEY_1)
    write_key_file(tmp_path / "k2.key", bytes(range(16)))
    inside = relay.inside if relay else ("127.0.0.1", 4434)
    vip = relay.vip if relay else ("127.0.0.1", 4433)
    path = tmp_path / "lb.toml"
    write_config(path, inside=inside, vip=vip, ports=two_free_udp_ports(),
                 configs=[(0, 14, "k0.key")])
    return path


def parse_ready(line: str) -> dict[str, str]:
    assert line.startswith("READY "), line
    return dict(item.split("=", 1) for item in line.split()[1:])


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def http_get(address: tuple[str, int], path: str) -> str:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return data.partition(b"\r\n\r\n")[2].decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_cli_serves_reloads_and_stops(tmp_path: Path, arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        relay = LoopbackLb(cid_configs=(CFG_0, CFG_1))
        await relay.start()
        config = make_config(tmp_path, relay)
        cert = tmp_path / "cert.pem"
        stderr = (tmp_path / "backend.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "backends", "-c", str(config), "--server-id", "0001",
            "--metrics", "127.0.0.1:0", "--cert-out", str(cert), "--log-level", "DEBUG",
            stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)).decode()
            ready = parse_ready(line)
            assert ready["server_id"] == "0001"
            assert ready["service"] == "echo"
            assert ready["pid"] == str(proc.pid)
            assert len(ready["spki"]) == 44  # base64 of 32 bytes
            address = split_address(ready["address"])
            metrics_at = split_address(ready["metrics"])
            relay.add_backend(b"\x00\x01", address)

            async with EchoClient.connect(*relay.vip, cafile=str(cert)) as old:
                assert await old.echo(b"hello") == b"hello"
                assert decode_server_id(CFG_0, old.dcid) == b"\x00\x01"
                text = await http_get(metrics_at, "/metrics")
                assert metric(text, "connections_open") == 1
                assert metric(text, "unknown_cid_packets_total") == 0

                async def reloads(name: str, count: int) -> None:
                    for _ in range(500):  # bounded: about 5 s
                        if metric(await http_get(metrics_at, "/metrics"), name) >= count:
                            return
                        await asyncio.sleep(0.01)
                    raise AssertionError(f"{name} never reached {count}")

                # Rotation: append config 1, SIGHUP; new connections mint config-1 CIDs.
                write_config(config, inside=relay.inside, vip=relay.vip, ports=(address[1], free_udp_port()),
                             configs=[(0, 14, "k0.key"), (1, 14, "k1.key")])
                proc.send_signal(signal.SIGHUP)
                await reloads("config_reloads_total", 1)
                async with EchoClient.connect(*relay.vip, cafile=str(cert)) as new:
                    assert new.dcid[0] >> 5 == 1
                    assert decode_server_id(CFG_1, new.dcid) == b"\x00\x01"
                    assert await new.echo(b"rotated") == b"rotated"

                # A CID length change is refused; the backend keeps serving.
                write_config(config, inside=relay.inside, vip=relay.vip, ports=(address[1], free_udp_port()),
                             configs=[(0, 14, "k0.key"), (2, 10, "k2.key")])
                proc.send_signal(signal.SIGHUP)
                await reloads("config_reload_failures_total", 1)
                assert await old.echo(b"still here") == b"still here"
                assert metric(await http_get(metrics_at, "/metrics"), "unknown_cid_packets_total") == 0

            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10)
            stderr.close()
            relay.close()
        log = (tmp_path / "backend.log").read_text()
        assert "SPKI SHA-256: " + ready["spki"] in log
        assert "a CID length change needs a backend restart" in log

    arun(scenario(), timeout=60)


def test_unknown_server_id_names_the_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path)
    assert main(["-c", str(config), "--server-id", "00ff"]) == 2
    err = capsys.readouterr().err
    assert "server id 00ff" in err
    assert "known server IDs: 0001, 0002" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--server-id", "zz"], "not hex"),
        (["--server-id", "0001", "--service", "nope"], "no service named 'nope'"),
        (["--server-id", "0001", "--metrics", "localhost:9"], "not an IP address"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                             message: str) -> None:
    config = make_config(tmp_path)
    assert main(["-c", str(config), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(tmp_path / "absent.toml"), "--server-id", "0001"]) == 2
    assert "cannot read configuration" in capsys.readouterr().err


def test_address_in_use_exits_1(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    text = config.read_text()
    port = int(text.split('address = "127.0.0.1:')[1].split('"')[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", port))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "backends", "-c", str(config), "--server-id", "0001"],
            capture_output=True, timeout=30, env=env, check=False,
        )
    assert done.returncode == 1
    assert b"cannot bind" in done.stderr
    assert b"READY" not in done.stdout
