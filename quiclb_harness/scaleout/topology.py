"""The scale-out topology in network namespaces, built and removed by :class:`ScaleoutTopology`.

::

    client ns ──veth── router ns (BIRD, ECMP, L4 hash) ──veth── LB 1 ns (quiclb, BIRD, announce)
    10.0.0.2           10.0.0.1 │ 10.1.i.1 │ 10.2.0.1  ──veth── LB 2 ns ...  each LB: 10.1.i.2,
                                │          └──veth── backend ns 10.2.0.2     VIP + inside on lo
                                └── VIP/32 and inside/32: nexthop via every LB that announces them

Every LB runs ``quiclb run`` with the same configuration. The VIP and the
inside address live on every LB's loopback; the router learns both by BGP
from each LB's BIRD (announced only while ``quiclb announce`` sees the LB
healthy) and spreads flows over the LBs by kernel ECMP with the L4 hash.
Backends send replies to the inside address, which the router spreads the
same way, so any LB returns any reply. Each LB probes its backends from its
own link address (``--probe-source``), so an answer returned by any LB comes
back to the LB that probed.

Names carry a per-run prefix; :meth:`close` kills only the processes started
here (by PID) and deletes only the namespaces created here.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiclb_harness.admin_client import admin_request
from quiclb_harness.deployment import BackendSpec, Deployment, ServiceSpec
from quiclb_harness.processes import ManagedProcess
from quiclb_harness.scaleout.bird import VIP_PROTOCOL, Timers, lb_config, router_config
from quiclb_harness.scaleout.netns import IngressCounter, Netns, call_in, run, unique_prefix

VIP, VIP_PORT = "192.0.2.10", 4433
INSIDE, INSIDE_PORT = "10.255.0.1", 4434
ADMIN_PORT = 9180
CLIENT_ADDR, ROUTER_CLIENT_ADDR = "10.0.0.2", "10.0.0.1"
BACKEND_ADDR, ROUTER_BACKEND_ADDR = "10.2.0.2", "10.2.0.1"
BACKEND_BASE_PORT = 5000


def lb_link(index: int) -> tuple[str, str]:
    """(router side, LB side) addresses of LB ``index``'s link; the LB side is its probe source."""
    return f"10.1.{index}.1", f"10.1.{index}.2"


@dataclass
class LbNode:
    index: int
    ns: Netns
    quiclb: ManagedProcess | None = None
    bird: ManagedProcess | None = None
    announcer: ManagedProcess | None = None
    control_socket: str = ""
    ingress: IngressCounter | None = None

    @property
    def address(self) -> str:
        return lb_link(self.index)[1]

    def processes(self) -> list[ManagedProcess]:
        return [p for p in (self.quiclb, self.announcer, self.bird) if p is not None]

    def freeze(self) -> None:
        """The host stops dead (a crash, a power loss): every process SIGSTOPped at once.

        Unlike a bare kill -9, nothing is said on the way out: a killed BIRD's kernel would
        close its BGP session with a FIN, which a crashed host never sends. The router must
        notice the silence (BFD, else the hold timer).
        """
        for p in self.processes():
            p.signal(signal.SIGSTOP)

    def kill_all(self) -> None:
        """kill -9 quiclb, its speaker's control loop and BIRD, at once (by PID) and reap them."""
        for p in self.processes():
            p.signal(signal.SIGKILL)
        for p in self.processes():
            p.kill()


@dataclass
class ScaleoutTopology:
    directory: Path
    lbs: int = 3
    slots: int = 4  # router BGP slots: LBs that may join later (a ToR configured for the rack)
    server_ids: tuple[str, ...] = ("0001", "0002", "0003")
    return_mode: str = "via-lb"
    timers: Timers = field(default_factory=Timers)
    io: str = "batched"
    health_interval: float = 0.5
    #: False: the LBs probe from the VIP as a single LB does (to show why several need --probe-source).
    probe_source: bool = True
    prefix: str = field(default_factory=unique_prefix)
    nodes: dict[int, LbNode] = field(default_factory=dict)
    namespaces: list[Netns] = field(default_factory=list)
    processes: list[ManagedProcess] = field(default_factory=list)
    backends: dict[str, ManagedProcess] = field(default_factory=dict)

    def __enter__(self) -> ScaleoutTopology:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- construction -----------------------------------------------------------

    def build(self) -> None:
        self.sockets = Path(tempfile.mkdtemp(prefix="qlb-", dir="/tmp"))  # short: unix socket paths
        self.router = self._netns("r")
        self.client = self._netns("c")
        self.backend = self._netns("b")
        self.router.sysctl(net__ipv4__ip_forward=1, net__ipv4__fib_multipath_hash_policy=1,
                           net__ipv4__conf__all__rp_filter=0, net__ipv4__conf__default__rp_filter=0)
        self._link(self.client, "cl", ROUTER_CLIENT_ADDR, CLIENT_ADDR)
        self._link(self.backend, "bk", ROUTER_BACKEND_ADDR, BACKEND_ADDR)
        self.backend.sysctl(net__ipv4__conf__all__rp_filter=0)
        self.dep = Deployment(
            self.directory,
            [ServiceSpec(vip_host=VIP, vip_port=VIP_PORT, backends=[
                BackendSpec(sid, port=BACKEND_BASE_PORT + i, host=BACKEND_ADDR) for i, sid in enumerate(self.server_ids)
            ])],
            inside_host=INSIDE, inside_port=INSIDE_PORT, admin_port=ADMIN_PORT, tls=True,
            return_mode=self.return_mode, health_interval=self.health_interval,
            health_timeout=self.health_interval,
        )
        self.dep.write()
        conf = self.directory / "bird-router.conf"
        conf.write_text(router_config(ROUTER_CLIENT_ADDR, [lb_link(i) for i in range(1, self.slots + 1)],
                                      [f"{VIP}/32", f"{INSIDE}/32"], self.timers))
        self.router_socket = str(self.sockets / "router.ctl")
        self.router_bird = self._bird(self.router, conf, self.router_socket, "bird-router")
        for sid in self.server_ids:
            self.start_backend(sid)
        for i in range(1, self.lbs + 1):
            self.add_lb(i)

    def _netns(self, role: str) -> Netns:
        ns = Netns(f"{self.prefix}{role}")
        self.namespaces.append(ns)
        return ns

    def _link(self, ns: Netns, router_dev: str, router_addr: str, addr: str) -> None:
        self.router.ip("link", "add", router_dev, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        self.router.ip("addr", "add", f"{router_addr}/24", "dev", router_dev)
        ns.ip("addr", "add", f"{addr}/24", "dev", "eth0")
        self.router.ip("link", "set", router_dev, "up")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("route", "add", "default", "via", router_addr)

    def _start(self, ns: Netns, argv: list[str], name: str, *, ready: bool = True) -> ManagedProcess:
        p = ManagedProcess(ns.exec_argv(argv), name=name)
        self.processes.append(p)
        if ready:
            p.wait_ready()
        return p

    def _bird(self, ns: Netns, conf: Path, sock: str, name: str) -> ManagedProcess:
        p = self._start(ns, ["bird", "-f", "-c", str(conf), "-s", sock, "-P", sock + ".pid"], name, ready=False)
        deadline = time.monotonic() + 10
        while run(["birdc", "-s", sock, "show", "status"], check=False).find("Daemon is up") < 0:
            if not p.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{p.output()}")
            time.sleep(0.05)
        return p

    def start_backend(self, sid: str) -> ManagedProcess:
        p = self._start(self.backend, [sys.executable, "-m", "backends", "-c", str(self.dep.path),
                                       "--server-id", sid, "--metrics", "127.0.0.1:0"], f"backend-{sid}")
        self.backends[sid] = p
        return p

    def add_lb(self, index: int, *, wait_announced: bool = True) -> LbNode:
        """A new LB host: namespace, link, VIP and inside address on lo, BIRD, quiclb, announce."""
        if not 1 <= index <= self.slots:
            raise ValueError(f"LB index 1..{self.slots}")
        ns = self._netns(f"l{index}")
        router_addr, addr = lb_link(index)
        node = LbNode(index, ns, control_socket=str(self.sockets / f"lb{index}.ctl"))
        self.nodes[index] = node
        self.router.ip("link", "add", f"lb{index}", "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        self.router.ip("addr", "add", f"{router_addr}/24", "dev", f"lb{index}")
        self.router.sysctl(**{f"net__ipv4__conf__lb{index}__rp_filter": 0})
        ns.ip("addr", "add", f"{addr}/24", "dev", "eth0")
        ns.ip("addr", "add", f"{VIP}/32", "dev", "lo")
        ns.ip("addr", "add", f"{INSIDE}/32", "dev", "lo")
        # Probe answers come back from the VIP, an address this host holds too: accept_local.
        ns.sysctl(net__ipv4__conf__all__accept_local=1, net__ipv4__conf__eth0__accept_local=1,
                  net__ipv4__conf__all__rp_filter=2, net__ipv4__conf__eth0__rp_filter=2)
        self.router.ip("link", "set", f"lb{index}", "up")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("route", "add", "default", "via", router_addr)
        # What reaches the LB host for the VIP and the inside port, counted even when no LB runs.
        node.ingress = IngressCounter(ns.name, "eth0", (VIP_PORT, INSIDE_PORT))
        conf = self.directory / f"bird-lb{index}.conf"
        conf.write_text(lb_config(addr, addr, router_addr, [f"{VIP}/32", f"{INSIDE}/32"], self.timers))
        node.bird = self._bird(ns, conf, node.control_socket, f"bird-lb{index}")
        self.start_quiclb(node)
        if wait_announced:
            self.wait_nexthops(lambda hops: addr in hops, 30, f"LB {index} announced")
        return node

    def start_quiclb(self, node: LbNode) -> None:
        probe = ["--probe-source", node.address] if self.probe_source else []
        node.quiclb = self._start(node.ns, [
            sys.executable, "-m", "lb", "run", "-c", str(self.dep.path), "--io", self.io, *probe,
            "--drain-quiet", "1.5"], f"quiclb-{node.index}")
        node.announcer = self._start(node.ns, [
            sys.executable, "-m", "lb", "announce", "--healthz", f"http://127.0.0.1:{ADMIN_PORT}/healthz",
            "--protocol", VIP_PROTOCOL, "--birdc-socket", node.control_socket, "--interval", "0.1"],
            f"announce-{node.index}")

    # -- observation ------------------------------------------------------------

    def nexthops(self, prefix: str = VIP) -> set[str]:
        """Gateways of the router's kernel route to ``prefix``/32 (empty when none)."""
        routes = self.router.ip_json("route", "show", f"{prefix}/32")
        hops: set[str] = set()
        for r in routes:
            if "gateway" in r:
                hops.add(r["gateway"])
            for nh in r.get("nexthops", []):
                hops.add(nh["gateway"])
        return hops

    def wait_nexthops(self, predicate: Any, timeout: float, what: str, poll: float = 0.01) -> float:
        """Poll the router's VIP route until ``predicate(gateways)``; the seconds it took."""
        start = time.monotonic()
        while not predicate(self.nexthops()):
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{what}: not within {timeout} s; nexthops now {sorted(self.nexthops())}")
            time.sleep(poll)
        return time.monotonic() - start

    def admin(self, index: int, path: str) -> tuple[int, bytes]:
        token = self.dep.token
        return call_in(self.nodes[index].ns.name, lambda: admin_request(("127.0.0.1", ADMIN_PORT), "GET", path, token))

    def admin_json(self, index: int, path: str) -> Any:
        import json  # noqa: PLC0415

        status, body = self.admin(index, path)
        if status != 200:
            raise RuntimeError(f"LB {index} {path}: {status} {body[:200]!r}")
        return json.loads(body)

    def ingress(self, index: int) -> int:
        """Datagrams (VIP and inside port) that reached LB ``index``'s host so far."""
        counter = self.nodes[index].ingress
        return counter.total() if counter is not None else 0

    def ingress_by_port(self, index: int) -> dict[int, int]:
        counter = self.nodes[index].ingress
        return dict(counter.counts) if counter is not None else {}

    def live(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.quiclb is not None and n.quiclb.alive()]

    # -- teardown ---------------------------------------------------------------

    def close(self) -> None:
        for p in reversed(self.processes):
            with contextlib.suppress(Exception):  # keep tearing down
                p.kill()
        for node in self.nodes.values():
            if node.ingress is not None:
                node.ingress.close()
        for ns in reversed(self.namespaces):
            ns.delete()
        if getattr(self, "sockets", None) is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)
