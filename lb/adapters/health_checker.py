"""The health checker: probe ports, the probe schedule and probe I/O around ``lb.core.health``.

The checker is a client of its own LB: a probe is a greased-version long
header sent, behind the PROXY header every forward carries, from the inside
socket to the backend, naming the checker's *probe port* as the client and the
service's VIP as destination. The backend's Version Negotiation answer comes
back through the return path like any reply, leaves from the VIP and reaches
the probe port — so a healthy verdict means the whole round trip works.

One probe port per VIP address family (a PROXY header's two addresses must be
of one family), bound to the VIP's IP, or to this LB's own *probe source*
for that family (``quiclb run --probe-source``). With several LB hosts behind
ECMP the answer returns through whichever LB the backend's reply flow hashes
to; that LB sends it from the VIP to the probe port's address. A VIP-bound
port exists on every LB, so the answer would land on the wrong one; a per-LB
unicast address routes it back to the LB that probed. The schedule is :class:`~lb.core.health.HealthTracker`'s; this
module only reads the event loop's monotonic clock — the clock the table
updater's tombstones use too — and reports health flips to ``on_change``
with the services they concern.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from lb.adapters.datapath import Datapath, ProbePort
from lb.core.addresses import Address
from lb.core.encapsulation import ProxyHeaderEncoder
from lb.core.health import NONCE_LEN, HealthKey, HealthStatus, HealthTracker, build_probe, probe_reply_nonce_untrusted

log = logging.getLogger("quiclb")

#: Shortest sleep between two passes, so a due-now schedule cannot spin the loop.
MIN_TICK_SECONDS = 0.01


@dataclass(frozen=True)
class ProbeTarget:
    """One backend to probe, and the VIP its probes name (they return from it)."""

    service: str
    server_id: bytes
    backend: Address
    vip: Address


@dataclass(frozen=True)
class HealthStats:
    statuses: Mapping[HealthKey, HealthStatus]
    probes_not_sent: int  # the kernel refused the send; the probe then times out as a miss


def _family(address: Address) -> int:
    return ipaddress.ip_address(address[0]).version


class HealthChecker:
    """Probes every target on the tracker's schedule; ``on_change(services)`` after any flip."""

    def __init__(self, datapath: Datapath, tracker: HealthTracker[HealthKey],
                 on_change: Callable[[set[str]], None], probe_sources: Iterable[str] = ()) -> None:
        self.datapath = datapath
        #: IP version -> the host probe ports bind to instead of the VIP's (``--probe-source``).
        self.probe_sources: dict[int, str] = {ipaddress.ip_address(h).version: h for h in probe_sources}
        self.tracker = tracker
        self._on_change = on_change
        self._encode = ProxyHeaderEncoder().encode
        self._targets: dict[HealthKey, ProbeTarget] = {}
        self._ports: dict[int, ProbePort] = {}  # by IP version
        self._task: asyncio.Task[None] | None = None
        self._not_sent = 0

    async def open_probe_ports(self, vips: Iterable[Address]) -> None:
        """Phase 1 of a start or reload (may fail, changes nothing visible): a port per new VIP family."""
        for vip in vips:
            family = _family(vip)
            if family not in self._ports:
                host = self.probe_sources.get(family, vip[0])
                self._ports[family] = await self.datapath.open_probe(host, self._on_reply)

    def set_targets(self, targets: Iterable[ProbeTarget], interval: float, timeout: float, threshold: int) -> None:
        """Phase 2 (synchronous): the new schedule and targets; known backends keep their state."""
        self.tracker.configure(interval, timeout, threshold)
        self._targets = {(t.service, t.server_id): t for t in targets}
        self.tracker.set_targets(self._targets)

    def unhealthy(self) -> frozenset[HealthKey]:
        return self.tracker.unhealthy()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for port in self._ports.values():
            port.close()
        self._ports.clear()

    # -- the loop -------------------------------------------------------------

    async def _run(self) -> None:
        # time.monotonic(), not loop.time(): uvloop's clock ticks in whole milliseconds (libuv's
        # uv_now), which made every loopback probe RTT read 0 or 1.000 ms. Both are CLOCK_MONOTONIC.
        clock = time.monotonic
        while True:
            now = clock()
            changed = self.tracker.expire(now)
            for service, sid in changed:
                log.warning("backend %s/%s is down: %d probes unanswered", service, sid.hex(), self.tracker.threshold)
            if changed:
                self._on_change({service for service, _ in changed})
            self._send_due(now)
            now = clock()
            delay = self.tracker.next_wakeup(now) - now
            await asyncio.sleep(min(max(delay, MIN_TICK_SECONDS), self.tracker.interval))

    def _send_due(self, now: float) -> None:
        for key, nonce in self.tracker.due(now, lambda: secrets.token_bytes(NONCE_LEN)):
            target = self._targets.get(key)
            port = self._ports.get(_family(target.vip)) if target is not None else None
            if target is None or port is None:
                continue
            try:
                self.datapath.send_probe(self._encode(port.address, target.vip) + build_probe(nonce), target.backend)
            except (OSError, ValueError) as exc:
                # Counted as a miss when the timeout expires; say why once per probe.
                self._not_sent += 1
                log.warning("health probe to %s/%s not sent: %s", key[0], key[1].hex(), exc)

    def _on_reply(self, data: bytes, source: Address) -> None:
        nonce = probe_reply_nonce_untrusted(data)
        if nonce is None:
            return
        result = self.tracker.on_reply(nonce, time.monotonic())
        if result is not None and result[1]:
            service, sid = result[0]
            log.warning("backend %s/%s is up again", service, sid.hex())
            self._on_change({service})

    def stats(self) -> HealthStats:
        statuses = {}
        for key in self._targets:
            status = self.tracker.status(key)
            if status is not None:
                statuses[key] = status
        return HealthStats(statuses, self._not_sent)
