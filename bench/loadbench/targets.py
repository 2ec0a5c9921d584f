"""The processes under test: quiclb, the C forwarder (the ceiling) and nginx's stream UDP proxy.

Each target listens on ``port`` once ``start()`` returns, forwards to the
sink ports it was given, and is stopped by PID. ``pid`` is the root of the
process tree whose CPU time is charged to it (nginx's master and worker,
quiclb's supervisor and --workers children). The LB's TOML is written here
from the documented schema (design.md §5), not from a test helper, so the
benchmark depends on nothing but the LB's command line and config format.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lb import CidConfig

from .procstat import pin_tree, process_tree, start_time, udp_drops
from .tools import Child

SOCKET_BUFFER = "4m"  # nginx listen rcvbuf/sndbuf, like the LB's 4 MiB
APT_NGINX = "apt-get update -qq && apt-get install -y -qq nginx libnginx-mod-stream"


def free_udp_port(host: str) -> int:
    """A UDP port that was free a moment ago (bind port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_lb_config(directory: Path, host: str, cfg: CidConfig, backend_ports: list[int], inside_port: int) -> tuple[
        Path, int]:
    """One service, 3 backends (the sink's ports), health probes hourly (sinks never answer them).

    Returns (config path, VIP port). The key file is written mode 0600, as the LB requires.
    """
    directory.mkdir(parents=True, exist_ok=True)
    assert cfg.key is not None
    key_path = directory / "bench.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(cfg.key.hex() + "\n")
    vip_port = free_udp_port(host)
    lines = [
        "version = 1", "", "[lb]", f'inside = "{host}:{inside_port}"', 'return_mode = "via-lb"',
        'unroutable_short_header = "drop"', "health_interval = 3600.0", "health_timeout = 1.0",
        "health_threshold = 3", "", "[[service]]", 'name = "bench"', f'vip = "{host}:{vip_port}"', "",
        "[[service.cid_config]]", f"config_id = {cfg.config_id}", f"server_id_len = {cfg.server_id_len}",
        f"nonce_len = {cfg.nonce_len}", "self_encode_length = true", 'key_file = "bench.key"',
    ]
    for i, port in enumerate(backend_ports, start=1):
        sid = i.to_bytes(cfg.server_id_len, "big").hex()
        lines += ["", "[[service.backend]]", f'server_id = "{sid}"', f'address = "{host}:{port}"', 'state = "active"']
    path = directory / "lb.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, vip_port


def lb_io_choices() -> list[str]:
    """The values ``quiclb run --io`` accepts, read from its --help ([] when it has no --io)."""
    r = subprocess.run([sys.executable, "-m", "lb", "run", "--help"], capture_output=True, text=True, check=False,
                       timeout=30)
    text = " ".join(r.stdout.split())
    if "--io {" not in text:
        return []
    return text.split("--io {", 1)[1].split("}", 1)[0].split(",")


@dataclass
class Target:
    """A process under test. ``kind`` names the baseline family: quiclb, c-forward or nginx."""

    name: str
    kind: str
    description: str
    port: int = 0
    cpu: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


@dataclass
class ReadyTarget(Target):
    """A target that prints READY (udp_forward: ``port=N``; quiclb: its VIP is known before start)."""

    argv: list[str] = field(default_factory=list)
    fixed_port: int = 0
    child: Child | None = None

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def start(self) -> None:
        self.child = Child(self.argv, self.name)
        fields = self.child.wait_ready()
        self.port = self.fixed_port or int(fields["port"])
        time.sleep(0.2)  # quiclb --workers: children announce READY before the supervisor; let the tree settle
        pin_tree(self.child.pid, self.cpu)

    def stop(self) -> None:
        if self.child is None:
            return
        code = self.child.stop()
        self.info = {"exit_code": code}
        if code not in (0, -signal.SIGTERM):
            self.info["output_tail"] = self.child.tail[-20:]
        self.child = None


@dataclass
class NginxTarget(Target):
    """nginx -g 'daemon off;', stream UDP proxy to one sink port, default settings; stopped by PID."""

    exe: str = "nginx"
    stream_module: Path | None = None
    upstream: tuple[str, int] = ("127.0.0.1", 0)
    workdir: Path = Path()
    proc: subprocess.Popen[bytes] | None = None
    tree: list[tuple[int, str | None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        host = self.upstream[0]
        self.port = free_udp_port(host)
        d = self.workdir / self.name
        d.mkdir(parents=True, exist_ok=True)
        load = f"load_module {self.stream_module};\n" if self.stream_module else ""
        user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
        (d / "nginx.conf").write_text(
            f"{load}{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
            "events { worker_connections 4096; }\n"
            "stream {\n    server {\n"
            f"        listen {host}:{self.port} udp rcvbuf={SOCKET_BUFFER} sndbuf={SOCKET_BUFFER};\n"
            f"        proxy_pass {host}:{self.upstream[1]};\n"
            "    }\n}\n"
        )
        with (d / "stdout.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [self.exe, "-p", f"{d}/", "-c", str(d / "nginx.conf"), "-e", str(d / "error.log"),
                 "-g", "daemon off;"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while self.port not in udp_drops() or len(process_tree(self.proc.pid)) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                err = (d / "error.log").read_text() if (d / "error.log").exists() else ""
                raise RuntimeError(f"nginx did not start:\n{(d / 'stdout.log').read_text()}\n{err}")
            time.sleep(0.05)
        self.tree = [(p, start_time(p)) for p in process_tree(self.proc.pid)]
        pin_tree(self.proc.pid, self.cpu)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to the master: fast shutdown of the worker too
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for pid, started in self.tree[1:]:  # a worker outliving a killed master: by PID, if still the same
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.info = {"exit_code": self.proc.returncode}
        self.proc = None


def nginx_setup(exe: str | None) -> tuple[str | None, Path | None, str]:
    """(binary, stream module to load or None, version text); binary None (with a reason) when unusable."""
    exe = exe or shutil.which("nginx") or "/usr/sbin/nginx"
    if not (shutil.which(exe) or Path(exe).exists()):
        return None, None, f"nginx not installed; install it with: {APT_NGINX}"
    r = subprocess.run([exe, "-V"], capture_output=True, text=True, check=False, timeout=20)
    info = (r.stdout + r.stderr).strip()
    version = info.splitlines()[0] if info else "?"
    if "--with-stream=dynamic" in info:
        dirs = [Path(exe).resolve().parents[1] / "lib/nginx/modules"]
        dirs += [Path(a.split("=", 1)[1]) for a in info.split() if a.startswith("--modules-path=")]
        for m in (dd / "ngx_stream_module.so" for dd in dirs):
            if m.exists():
                return exe, m, version
        return None, None, f"{version}: the stream module is missing; install it with: {APT_NGINX}"
    if "--with-stream" not in info:
        return None, None, f"{version}: built without the stream module"
    return exe, None, version
