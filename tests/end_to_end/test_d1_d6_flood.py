"""D-1 garbage flood and D-6 one hot flow (acceptance.md §2.4), through real processes on loopback.

C is measured here first, with the flood's own traffic (random short headers whose DCID names
the live configuration, so the LB runs its decoder on every one and drops it as an unknown
server ID: the expensive garbage): a paced ramp from a separate generator process
(:mod:`quiclb_harness.flood`); C is the highest step the LB received with loss <= 0.1 %
(kernel receive-queue drops show as datagrams sent but never counted in
``quiclb_rx_client_datagrams_total``).

Honest limits of a 2-core machine: the generator, the LB, three aioquic backends and the
W(50, 0.5 s) clients share two cores, so the LB's C here is what it reaches while the
generator takes most of the other core, and at 2·C the LB and the generator together want
more than the machine has: the backends and clients then run on what is left. The
thresholds are the acceptance figures; when the generator cannot reach the requested rate
the test floods at the rate it reached and says so (the assertion on the achieved rate keeps
the test from passing on a generator that sent nothing). The generator runs at nice 10 so that
it yields the CPU to the processes whose latency is measured; it still has to reach 90 % of
the 0.5·C rate.

D-1: 0.5·C for 10 s during W(50, 0.5 s): >= 99 % of requests answered, p99 <= 2x baseline
(<= max(2x, baseline + 10 ms)); then 2·C for 5 s (opt-in: 30 s): no connection closes and
every request sent from 2 s after the flood on is answered. D-6: one 5-tuple at 0.5·C for
10 s: every other request answered, p99 <= 2x baseline.

What runs where, and why: the p99 <= 2x baseline comparisons are milliseconds against
milliseconds, and on the shared 2-core machine other processes' scheduling noise dominated
them (3 runs in a row while another test suite ran: baseline p99 2-6 ms, 0.5·C p99 2.3, 5.6
and 36 ms, once a D-6 p99 of 113 ms against a 4 ms baseline, and C itself measured 40k-320k/s).
So CI asserts everything else at the
acceptance figures and the latency only against a ceiling (:data:`CI_P99_CEILING`, far
above the noise, far below the 3 s deadline: garbage forwarded to the backends instead of
dropped blows through it); the opt-in runs (``make test-optin``, a quiet machine) assert the
acceptance bound itself.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from quiclb_harness.admin_client import metric_sum
from quiclb_harness.quic_cluster import QuicCluster
from quiclb_harness.workload import EchoWorkload, close_clients, open_clients

#: Ramp steps (datagrams/s), each held STEP_SECONDS; stops at the first lossy step.
RAMP = (20_000, 40_000, 80_000, 120_000, 160_000, 200_000, 240_000, 280_000, 320_000, 400_000, 480_000,
        640_000)
STEP_SECONDS = 1.5
MAX_LOSS = 0.001
CONNECTIONS = 50
INTERVAL = 0.5
BASELINE_SECONDS = 6.0
#: CI's latency ceiling (see the module docstring); opt-in runs use the acceptance bound.
CI_P99_CEILING = 0.5
RX = "quiclb_rx_client_datagrams_total"
DROPPED = "quiclb_unknown_sid_dropped_total"


#: One request: (seconds since the workload started when it was sent, latency or None if it failed).
Sample = tuple[float, float | None]


@dataclass
class Capacity:
    rate: float
    steps: list[tuple[float, float, float]]  # (target rate, achieved rate, loss)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuicCluster]:
    c = QuicCluster(tmp_path_factory.mktemp("flood"))
    try:
        c.start()
        yield c
    finally:
        c.close()


async def run_flood(cluster: QuicCluster, rate: float, seconds: float, flows: int = 64) -> dict[str, float]:
    host, port = cluster.dep.vip()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quiclb_harness.flood", "--target", f"{host}:{port}", "--rate", str(rate),
        "--seconds", str(seconds), "--flows", str(flows), "--config-id", "0", "--nice", "10",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 20)
    except TimeoutError:
        proc.kill()  # by PID: the process object is ours
        await proc.wait()
        raise
    result: dict[str, float] = json.loads(out)
    return result


def rx(cluster: QuicCluster) -> float:
    return metric_sum(cluster.lb_metrics(), RX)


def settled_rx(cluster: QuicCluster, timeout: float = 5.0) -> float:
    """The LB's receive counter once it stops moving (its queue drained), bounded."""
    deadline = time.monotonic() + timeout
    last = rx(cluster)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rx(cluster)
        if now == last:
            return now
        last = now
    return last


@pytest.fixture(scope="module")
def capacity(cluster: QuicCluster) -> Capacity:
    steps: list[tuple[float, float, float]] = []
    best = 0.0
    dropped_before = metric_sum(cluster.lb_metrics(), DROPPED)
    total_sent = 0.0
    for rate in RAMP:
        before = settled_rx(cluster)
        result = asyncio.run(run_flood(cluster, rate, STEP_SECONDS))
        received = settled_rx(cluster) - before
        sent = result["sent"]
        total_sent += sent
        loss = max(0.0, 1 - received / sent) if sent else 1.0
        achieved = sent / result["seconds"]
        steps.append((rate, achieved, loss))
        if loss > MAX_LOSS:
            break
        best = achieved
        if achieved < 0.9 * rate:  # the generator, not the LB, is the limit
            break
    print(f"D-0 ramp (target/s, achieved/s, loss): {steps}; C = {best:.0f}/s", flush=True)
    assert best > 0, steps
    # The flood is the expensive garbage: every datagram went through the CID decoder.
    decoded = metric_sum(cluster.lb_metrics(), DROPPED) - dropped_before
    assert decoded >= 0.9 * total_sent * (1 - steps[-1][2]), (decoded, total_sent, steps)
    return Capacity(best, steps)


def p99(results: list[Sample]) -> float:
    lat = sorted(latency for _, latency in results if latency is not None)
    return lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("inf")


def bound(baseline: float) -> float:
    """acceptance.md: "<= 2x baseline" means <= max(2x baseline, baseline + 10 ms)."""
    return max(2 * baseline, baseline + 0.010)


async def workload_with_floods(cluster: QuicCluster, floods: list[tuple[float, float, float, int]],
                               total: float) -> tuple[list[Sample], list[int], list[dict[str, float]]]:
    """W(50, 0.5 s) for ``total`` s; each flood (start, rate, seconds, flows) starts at ``start`` s."""
    host, port = cluster.dep.vip()
    clients = await open_clients(host, port, CONNECTIONS, cadata=cluster.cert_pem)
    try:
        workload = EchoWorkload(clients, INTERVAL)
        run = asyncio.ensure_future(workload.run(total))
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def later(start: float, rate: float, seconds: float, flows: int) -> dict[str, float]:
            await asyncio.sleep(max(0.0, t0 + start - loop.time()))
            return await run_flood(cluster, rate, seconds, flows)

        results = await asyncio.gather(*(later(*f) for f in floods))
        report = await run
        samples = [(r.sent_at - t0, r.latency) for r in report.results]
        return samples, report.closed, list(results)
    finally:
        await close_clients(clients)


def window(results: list[Sample], start: float, end: float) -> list[Sample]:
    return [r for r in results if start <= r[0] < end]


def run_d1(cluster: QuicCluster, capacity: Capacity, high_seconds: float, strict: bool) -> None:
    half, double = 0.5 * capacity.rate, 2 * capacity.rate
    b_end = BASELINE_SECONDS
    half_start, half_len = b_end, 10.0
    high_start = half_start + half_len + 2.0
    recover_from = high_start + high_seconds + 2.0
    total = recover_from + 4.0
    results, closed, floods = asyncio.run(workload_with_floods(
        cluster, [(half_start, half, half_len, 64), (high_start, double, high_seconds, 64)], total))
    baseline = p99(window(results, 1.0, b_end))
    during = window(results, half_start, half_start + half_len)
    ok = [r for r in during if r[1] is not None]
    high = window(results, high_start, recover_from)
    high_failed = sum(1 for _, latency in high if latency is None)
    achieved = [f["sent"] / f["seconds"] for f in floods]
    info = (f"C={capacity.rate:.0f}/s, floods achieved {achieved[0]:.0f}/s and {achieved[1]:.0f}/s; baseline p99 "
            f"{baseline * 1000:.1f} ms; 0.5C p99 {p99(during) * 1000:.1f} ms, {len(ok)}/{len(during)} answered; "
            f"2C: {high_failed}/{len(high)} failed, p99 {p99(high) * 1000:.1f} ms")
    print("D-1:", info, flush=True)
    assert achieved[0] >= 0.9 * half, info
    assert len(ok) >= 0.99 * len(during), info
    assert p99(during) <= (bound(baseline) if strict else CI_P99_CEILING), info
    # 2C: nothing of the connections is lost; service is back within 2 s after the flood.
    assert not closed, f"connections closed: {closed}; {info}"
    assert high_failed == 0, info
    after = window(results, recover_from, total)
    assert after and all(latency is not None for _, latency in after), info
    limit = bound(baseline) if strict else CI_P99_CEILING
    assert p99(after) <= limit, f"after the 2C flood p99 {p99(after) * 1000:.1f} ms; {info}"


def test_d1_garbage_flood(cluster: QuicCluster, capacity: Capacity) -> None:
    run_d1(cluster, capacity, high_seconds=5.0, strict=False)


@pytest.mark.optin
def test_d1_garbage_flood_strict_2c_30s(cluster: QuicCluster, capacity: Capacity) -> None:
    run_d1(cluster, capacity, high_seconds=30.0, strict=True)


def test_d6_one_hot_flow(cluster: QuicCluster, capacity: Capacity) -> None:
    run_d6(cluster, capacity, strict=False)


@pytest.mark.optin
def test_d6_one_hot_flow_strict(cluster: QuicCluster, capacity: Capacity) -> None:
    run_d6(cluster, capacity, strict=True)


def run_d6(cluster: QuicCluster, capacity: Capacity, strict: bool) -> None:
    rate = 0.5 * capacity.rate
    start, length = BASELINE_SECONDS, 10.0
    results, closed, floods = asyncio.run(workload_with_floods(cluster, [(start, rate, length, 1)], start + length))
    baseline = p99(window(results, 1.0, start))
    during = window(results, start, start + length)
    achieved = floods[0]["sent"] / floods[0]["seconds"]
    info = (f"C={capacity.rate:.0f}/s, hot flow {achieved:.0f}/s from one 5-tuple; baseline p99 "
            f"{baseline * 1000:.1f} ms, during {p99(during) * 1000:.1f} ms")
    print("D-6:", info, flush=True)
    assert achieved >= 0.9 * rate, info
    assert not closed and all(latency is not None for _, latency in during), info
    assert p99(during) <= (bound(baseline) if strict else CI_P99_CEILING), info
