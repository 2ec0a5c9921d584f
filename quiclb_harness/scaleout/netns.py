"""Network namespaces: create and delete them, run commands and Python threads inside them.

A thread can enter a namespace with ``setns(2)`` (CLONE_NEWNET is per thread);
every socket it creates then lives there. :func:`call_in` runs one function
that way (an admin query), :class:`NamespaceLoop` an asyncio loop (QUIC
clients), so the test process itself never leaves the root namespace and
nothing but our own namespaces carries traffic.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import json
import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """A namespace operation failed."""


def have_root() -> str | None:
    """None when namespaces can be made here, else why not (for a skip or the demo's message)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veths, routes): run as root, e.g. `sudo make demo-scaleout`"
    dirs = [*os.environ.get("PATH", "").split(":"), "/usr/sbin", "/sbin"]
    for tool in ("ip", "bird", "birdc"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in dirs):
            return f"needs {tool!r} (apt-get install iproute2 bird2); `make install` installs bird2"
    return None


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 20.0) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and out.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def unique_prefix(stem: str = "qlb") -> str:
    """A short, per-run namespace prefix: the pid and 4 random hex digits (parallel runs never collide)."""
    return f"{stem}{os.getpid() % 100000}{secrets.token_hex(2)}"


class Netns:
    """One named namespace (``ip netns``), deleted by :meth:`delete`."""

    def __init__(self, name: str) -> None:
        self.name = name
        run(["ip", "netns", "add", name])
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> str:
        return run(["ip", "-n", self.name, *args])

    def ip_json(self, *args: str) -> Any:
        return json.loads(run(["ip", "-n", self.name, "-j", *args]) or "[]")

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def sh(self, *argv: str, check: bool = True) -> str:
        return run(self.exec_argv(argv), check=check)

    def sysctl(self, **settings: str | int) -> None:
        """``sysctl -w`` in the namespace; keys spelled with ``__`` for ``.`` (``net__ipv4__ip_forward=1``)."""
        args = [f"{k.replace('__', '.')}={v}" for k, v in settings.items()]
        self.sh("sysctl", "-q", "-w", *args)

    def delete(self) -> None:
        run(["ip", "netns", "delete", self.name], check=False)


def _enter(name: str) -> None:
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(name: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """Run ``fn()`` in a new thread that entered namespace ``name``; its sockets live there."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            _enter(name)
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    t = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"call in {name} did not finish within {timeout} s")
    if error:
        raise error[0]
    return result[0]


class IngressCounter:
    """Counts UDP datagrams arriving on one interface of a namespace, by destination port.

    An AF_PACKET socket in a thread inside the namespace sees every packet the
    interface receives, whether or not a process still listens: after a
    ``kill -9`` it counts what the dead LB host was still sent (lost datagrams).
    """

    def __init__(self, ns: str, interface: str, ports: Sequence[int]) -> None:
        self.counts: dict[int, int] = dict.fromkeys(ports, 0)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ns, interface), name=f"count-{ns}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise NetnsError(f"ingress counter in {ns} did not start")

    def _run(self, ns: str, interface: str) -> None:
        import socket  # noqa: PLC0415

        _enter(ns)
        eth_p_ip = 0x0800
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(eth_p_ip))
        sock.bind((interface, eth_p_ip))
        sock.settimeout(0.1)
        self._ready.set()
        counts = self.counts
        with sock:
            while not self._stop.is_set():
                try:
                    packet, address = sock.recvfrom(128)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if address[2] == socket.PACKET_OUTGOING or len(packet) < 24 or packet[9] != 17:
                    continue
                ihl = (packet[0] & 0x0F) * 4
                port = int.from_bytes(packet[ihl + 2 : ihl + 4], "big")
                if port in counts:
                    counts[port] += 1

    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


class NamespaceLoop:
    """An asyncio event loop running in a thread inside namespace ``name``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def body() -> None:
            try:
                _enter(name)
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            asyncio.set_event_loop(self.loop)
            started.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=body, name=f"loop-{name}", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise failure[0]

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return self.submit(coro).result(timeout)

    def call(self, fn: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()
