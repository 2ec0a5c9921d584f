"""A bounded echo workload over real QUIC connections (acceptance.md §2.2, workload W(n, t)).

W(n, t): ``n`` connections through the LB; each sends a 100-byte echo request
every ``t`` seconds with a 3 s deadline. A connection is *lost* when one of its
requests misses the deadline (or comes back wrong) or the connection closes.

Requests are fired on a fixed schedule (tick ``k`` of connection ``i`` at
``start + (i / n + k) * t``, so the load is spread evenly over each period),
each on its own stream, so a request stuck in an LB gap does not delay the
next one. Every loop is bounded by a request count and by wall-clock time.

The clients are :class:`backends.client.EchoClient` instances; this module
only needs their ``echo`` coroutine and their ``protocol.terminated`` field,
and does not import the backends package at run time.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.client import EchoClient

#: W(n, t) constants (acceptance.md §2.2).
REQUEST_SIZE = 100
REQUEST_DEADLINE = 3.0


async def open_clients(
    host: str, port: int, n: int, *, cadata: bytes, alpn: str | None = None, concurrency: int = 16,
    timeout: float = 10.0,
) -> list[EchoClient]:
    """Open ``n`` connections, at most ``concurrency`` handshakes at a time.

    All or nothing: if one handshake fails, the ones that succeeded are closed
    and the error is raised.
    """
    from backends.client import EchoClient  # noqa: PLC0415 - the LB package does not depend on backends

    sem = asyncio.Semaphore(concurrency)

    async def one() -> EchoClient:
        async with sem:
            if alpn is None:
                return await EchoClient.open(host, port, cadata=cadata, timeout=timeout)
            return await EchoClient.open(host, port, cadata=cadata, timeout=timeout, alpn=alpn)

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    clients = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_clients(clients)
        raise errors[0]
    return clients


async def close_clients(clients: Sequence[EchoClient]) -> None:
    """Send CONNECTION_CLOSE on each and drop its socket (no closing-period wait)."""
    await asyncio.gather(*(c.close(wait=False) for c in clients), return_exceptions=True)


@dataclass(frozen=True)
class RequestResult:
    connection: int
    sequence: int
    #: Loop time at which the request was sent.
    sent_at: float
    #: Seconds until the echo came back, or ``None`` if it failed.
    latency: float | None
    error: str = ""
    #: ``id()`` of the client object the request went out on (a soak replaces connections).
    client_id: int = 0


@dataclass
class WorkloadReport:
    connections: int
    interval: float
    started_at: float = 0.0
    stopped_at: float = 0.0
    results: list[RequestResult] = field(default_factory=list)
    #: Connections found terminated (CONNECTION_CLOSE or idle timeout) at the end.
    closed: list[int] = field(default_factory=list)

    @property
    def failures(self) -> list[RequestResult]:
        return [r for r in self.results if r.latency is None]

    @property
    def lost(self) -> set[int]:
        """Connections with a failed request or that closed."""
        return {r.connection for r in self.failures} | set(self.closed)

    @property
    def latencies(self) -> list[float]:
        return [r.latency for r in self.results if r.latency is not None]

    @property
    def max_latency(self) -> float:
        return max(self.latencies, default=0.0)

    def per_connection(self) -> dict[int, int]:
        """Answered requests per connection."""
        out = dict.fromkeys(range(self.connections), 0)
        for r in self.results:
            if r.latency is not None:
                out[r.connection] += 1
        return out

    def summary(self) -> str:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0
        first = "; ".join(f"conn {r.connection} #{r.sequence}: {r.error}" for r in self.failures[:5])
        return (
            f"W({self.connections}, {self.interval}s) over {self.stopped_at - self.started_at:.1f}s: "
            f"{len(self.results)} requests, {len(self.failures)} failed, {len(self.closed)} closed, "
            f"lost {len(self.lost)}; latency p99 {p99 * 1000:.0f} ms, max {self.max_latency * 1000:.0f} ms"
            + (f"; first failures: {first}" if first else "")
        )


class EchoWorkload:
    """Run W(n, t) on open clients until :meth:`stop` (or ``max_duration``)."""

    def __init__(
        self, clients: Sequence[EchoClient], interval: float = 0.5, *, deadline: float = REQUEST_DEADLINE,
        size: int = REQUEST_SIZE,
    ) -> None:
        if not clients or interval <= 0 or deadline <= 0:
            raise ValueError("workload: need clients, interval > 0 and deadline > 0")
        self.clients = list(clients)
        self.interval = interval
        self.deadline = deadline
        self.size = size
        self.report = WorkloadReport(len(self.clients), interval)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """No new requests after this; :meth:`run` returns once the ones in flight are settled."""
        self._stop.set()

    @property
    def answered(self) -> int:
        return sum(1 for r in self.report.results if r.latency is not None)

    async def run(self, max_duration: float) -> WorkloadReport:
        """Send on schedule until stopped or ``max_duration`` s; then wait (≤ deadline) for the tail."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.report.started_at = start
        max_ticks = int(max_duration / self.interval) + 1
        n = len(self.clients)
        await asyncio.gather(
            *(self._connection(i, start + i / n * self.interval, max_ticks, start + max_duration) for i in range(n))
        )
        self.report.stopped_at = loop.time()
        self.report.closed = [i for i, c in enumerate(self.clients) if c.protocol.terminated is not None]
        return self.report

    async def _connection(self, index: int, first: float, max_ticks: int, end: float) -> None:
        loop = asyncio.get_running_loop()
        # Only requests in flight are kept: a 30-minute W(1000, 2 s) makes 900k requests, and
        # holding every finished task made the client's heap (and each full GC pass) grow with it.
        pending: set[asyncio.Task[None]] = set()
        for tick in range(max_ticks):
            at = first + tick * self.interval
            if at >= end:
                break
            try:
                await asyncio.wait_for(self._stop.wait(), max(0.0, at - loop.time()))
                break  # stopped
            except TimeoutError:
                pass  # the tick is due
            task = asyncio.ensure_future(self._request(index, tick))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)

    async def _request(self, index: int, sequence: int) -> None:
        loop = asyncio.get_running_loop()
        client = self.clients[index]
        payload = index.to_bytes(4, "big") + sequence.to_bytes(4, "big") + os.urandom(self.size - 8)
        sent = loop.time()
        try:
            reply = await client.echo(payload, timeout=self.deadline)
        except Exception as exc:  # a deadline miss or a closed connection: both count as lost
            self.report.results.append(
                RequestResult(index, sequence, sent, None, f"{type(exc).__name__}: {exc}", id(client)))
            return
        latency = loop.time() - sent
        if reply != payload:
            self.report.results.append(RequestResult(index, sequence, sent, None, "echo mismatch", id(client)))
        else:
            self.report.results.append(RequestResult(index, sequence, sent, latency, "", id(client)))
