"""Scenarios: which traffic, which LB configuration, which path, which targets; and how one is run.

Every scenario starts its targets once, side by side (each pinned to the
target CPU and idle when not loaded), then for each target finds capacity,
then measures CPU per datagram at one fixed rate that every target sustains,
targets interleaved round by round. The fixed rate is ``--fixed-rate`` or,
by default, 70% of the lowest capacity in the scenario, capped at 50k/s and
rounded down to 5k/s: below every target's knee, so CPU per datagram is not
inflated by overload (receive livelock) nor deflated by batching under backlog.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lb import CidConfig

from .measure import Bench, Load, cpu_rounds, find_capacity, run_ping
from .procstat import rss_bytes
from .targets import NginxTarget, ReadyTarget, Target, free_udp_port, write_lb_config
from .tools import Sink
from .traffic import heads_file, mix_file, mix_garbage, ping_file

TEST_KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")  # a fixed test key, as in micro_codec.py
SEED = 20_261_126
CACHED_DISTINCT = 4096  # always in the LB's 65536-entry decode cache
COLD_DISTINCT = 1_000_000  # far beyond it: nearly every datagram is a cache miss
FIXED_RATE_CAP = 50_000
FIXED_RATE_SHARE = 0.7
SINGLE_PASS = CidConfig(0, 2, 14, TEST_KEY)  # 2 + 14 = 16: one AES call per CID
FOUR_PASS = CidConfig(0, 3, 4, TEST_KEY)  # 3 + 4 = 7 != 16: the four-pass Feistel network


@dataclass
class Scenario:
    name: str
    description: str
    cfg: CidConfig
    size: int
    distinct: int
    path: str  # "forward" or "return" (round trip: forward, a sink's reply through the inside port, back)
    targets: list[str]
    mix: bool = False


@dataclass
class Env:
    """What the run shares: tools, CPUs, nginx, the LB's --io choices, timing knobs."""

    tools: dict[str, Path]
    host: str
    target_cpu: int | None
    load_cpu: int | None
    work: Path
    bench: Bench
    nginx: tuple[str | None, Path | None]
    io_choices: list[str]
    probe_seconds: float
    step_seconds: float
    cpu_seconds: float
    rounds: int
    fixed_rate: int | None
    max_seconds: float
    notes: list[str] = field(default_factory=list)

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def make_load(env: Env, sc: Scenario) -> Load:
    if sc.mix:
        periods = math.ceil(CACHED_DISTINCT / 100)
        path = mix_file(sc.cfg, sc.size, periods, SEED)

        def must_drop(t: Target, start: int, sent: int) -> int:
            return mix_garbage(start, sent) if t.kind == "quiclb" else 0  # plain forwarders forward garbage too

        return Load(sc.name, ["--file", str(path)], periods * 100, replies=False, must_drop=must_drop)
    path = heads_file(sc.cfg, sc.distinct, SEED + sc.distinct)
    return Load(sc.name, ["--heads", str(path), "--size", str(sc.size)], sc.distinct, replies=sc.path == "return")


@contextlib.contextmanager
def started(env: Env, sc: Scenario) -> Iterator[list[tuple[Target, Sink | None]]]:
    """Start the scenario's sinks and targets; yield (target, sink to count at or None); stop all by PID."""
    stack = contextlib.ExitStack()
    sink_life = env.max_seconds + 120
    pairs: list[tuple[Target, Sink | None]] = []
    with stack:
        shared: Sink | None = None
        if sc.path == "forward":
            shared = Sink(env.tools["udp_sink"], env.host, 3, env.load_cpu, sink_life)
            stack.callback(shared.stop)
        for name in sc.targets:
            inside = free_udp_port(env.host)
            sink = shared
            if sc.path == "return":  # each target gets sinks that answer through its own inside port
                mode = "echo" if name.startswith("nginx") else "reply"
                sink = Sink(env.tools["udp_sink"], env.host, 3, env.load_cpu, sink_life, mode=mode,
                            reply_to=f"{env.host}:{inside}")
                stack.callback(sink.stop)
            assert sink is not None
            t = make_target(env, sc, name, sink.ports, inside)
            t.start()
            stack.callback(t.stop)
            pairs.append((t, shared))
        yield pairs


def make_target(env: Env, sc: Scenario, name: str, ports: list[int], inside: int) -> Target:
    host, cpu = env.host, env.target_cpu
    if name == "c-forward":
        argv = [str(env.tools["udp_forward"]), "--listen", f"{host}:0", "--to",
                ",".join(f"{host}:{p}" for p in ports), "--seconds", f"{env.max_seconds + 120:.0f}"]
        if sc.path == "return":
            argv += ["--inside", f"{host}:{inside}"]
        if cpu is not None:
            argv += ["--cpu", str(cpu)]
        return ReadyTarget(name, "c-forward", "C recvmmsg/sendmmsg, batch 64, iovec [28 B PROXY v2, payload]",
                           cpu=cpu, argv=argv)
    if name == "nginx-default":
        exe, module = env.nginx
        assert exe is not None
        return NginxTarget(name, "nginx", "nginx stream UDP proxy, default settings", cpu=cpu, exe=exe,
                           stream_module=module, upstream=(host, ports[0]), workdir=env.work / "nginx")
    config, vip = write_lb_config(env.work / f"{sc.name}-{name}", host, sc.cfg, ports, inside)
    argv = [sys.executable, "-m", "lb", "run", "-c", str(config), "--log-level", "warning"]
    desc = "python -m lb run (default I/O)"
    if name.startswith("quiclb-io-"):
        io = name.removeprefix("quiclb-io-")
        argv += ["--io", io]
        desc = f"python -m lb run --io {io}"
    if name == "quiclb-workers2":
        argv += ["--workers", "2"]
        desc = "python -m lb run --workers 2 (unpinned: 2 processes on 2 CPUs shared with the generator)"
        cpu = None
    return ReadyTarget(name, "quiclb", desc, cpu=cpu, argv=argv, fixed_port=vip)


def choose_fixed_rate(env: Env, capacities: list[float]) -> int:
    if env.fixed_rate:
        return env.fixed_rate
    low = min((c for c in capacities if c > 0), default=10_000)
    return max(5_000, int(min(FIXED_RATE_CAP, FIXED_RATE_SHARE * low) // 5_000 * 5_000))


def run_scenario(env: Env, sc: Scenario) -> dict[str, Any]:
    env.log(f"scenario {sc.name}: {sc.description}; targets {', '.join(sc.targets)}")
    load = make_load(env, sc)
    result: dict[str, Any] = {"scenario": sc.name, "description": sc.description, "size": sc.size,
                              "distinct_dcids": load.distinct, "path": sc.path,
                              "cid_config": f"{sc.cfg.server_id_len}+{sc.cfg.nonce_len} ({sc.cfg.mode.value})",
                              "targets": {}}
    with started(env, sc) as pairs:
        for t, sink in pairs:
            env.log(f"  capacity {t.name}")
            cap = find_capacity(env.bench, t, load, sink, probe_seconds=env.probe_seconds,
                                step_seconds=env.step_seconds)
            result["targets"][t.name] = {"kind": t.kind, "description": t.description, "capacity": cap}
        rate = choose_fixed_rate(env, [v["capacity"]["capacity"] for v in result["targets"].values()])
        result["fixed_rate"] = rate
        env.log(f"  CPU per datagram at {rate / 1000:g}k/s, {env.rounds} interleaved rounds")
        cpu = cpu_rounds(env.bench, pairs, load, rate, env.cpu_seconds, env.rounds)
        for name, c in cpu.items():
            result["targets"][name]["cpu"] = c
        add_paired_ratios(result["targets"])
        for t, _ in pairs:
            with contextlib.suppress(OSError):
                result["targets"][t.name]["rss_bytes"] = rss_bytes(t.pid)
    ceiling = result["targets"].get("c-forward")
    if ceiling:
        cap = ceiling["capacity"]
        util = cap["unpaced"]["target_cpu_util"]
        result["ceiling_generator_bound"] = bool(cap["generator_bound"] or util < 0.9)
        result["ceiling_cpu_util_unpaced"] = util
    return result


def add_paired_ratios(targets: dict[str, Any]) -> None:
    """CPU per datagram over each baseline's, round by round (a pair shares that round's noise), median.

    Next to the ratio of medians this is the steadier figure when the machine drifts during a run.
    """
    for base in ("c-forward", "nginx-default"):
        if base not in targets or "cpu" not in targets[base]:
            continue
        ref = [s["cpu_us_per_datagram"] for s in targets[base]["cpu"]["steps"]]
        for name, t in targets.items():
            if name == base or "cpu" not in t:
                continue
            mine = [s["cpu_us_per_datagram"] for s in t["cpu"]["steps"]]
            ratios = [a / b for a, b in zip(mine, ref, strict=False) if a and b]
            if ratios:
                t["cpu"][f"over_{base}_paired_median"] = round(statistics.median(ratios), 3)
                t["cpu"][f"over_{base}_paired_min"] = round(min(ratios), 3)
                t["cpu"][f"over_{base}_paired_max"] = round(max(ratios), 3)


def run_latency(env: Env, count: int, rate: int = 1000) -> dict[str, Any]:
    """Round-trip time of single datagrams: direct to an echo sink, and through each LB and back (return path)."""
    env.log(f"latency: {count} pings at {rate}/s, direct vs through c-forward and quiclb (round trip)")
    sc = Scenario("latency", "", SINGLE_PASS, 100, 1, "return", ["c-forward", "quiclb"])
    ping = ping_file(sc.cfg, sc.size, SEED, env.work)
    out: dict[str, Any] = {"rate": rate, "count": count, "size": sc.size, "rounds": []}
    # The echo server sits on the target CPU: the direct path then crosses CPUs like the LB path does
    # (on a VM, waking an idle CPU costs tens of microseconds, which is not the LB's doing).
    echo = Sink(env.tools["udp_sink"], env.host, 1, env.target_cpu, env.max_seconds + 120, mode="echo")
    try:
        with started(env, sc) as pairs:
            for _ in range(2):  # interleaved: direct, c-forward, quiclb, direct, ...
                rnd = {"direct": run_ping(env.tools["udp_ping"], env.host, echo.ports[0], ping, rate, count,
                                          env.load_cpu)}
                for t, _s in pairs:
                    rnd[t.name] = run_ping(env.tools["udp_ping"], env.host, t.port, ping, rate, count, env.load_cpu)
                out["rounds"].append(rnd)
    finally:
        echo.stop()
    for name in ("direct", "c-forward", "quiclb"):
        for q in ("p50_us", "p99_us"):
            out[f"{name}_{q}"] = statistics.median(r[name][q] for r in out["rounds"])
    for name in ("c-forward", "quiclb"):
        for q in ("p50_us", "p99_us"):
            out[f"{name}_added_{q}"] = round(out[f"{name}_{q}"] - out[f"direct_{q}"], 1)
    for q in ("p50_us", "p99_us"):  # what quiclb adds beyond a C program doing the same two hops
        out[f"quiclb_over_c_forward_{q}"] = round(out[f"quiclb_{q}"] - out[f"c-forward_{q}"], 1)
    env.log(f"  added by quiclb over direct: p50 {out['quiclb_added_p50_us']} us, p99 {out['quiclb_added_p99_us']} us;"
            f" over c-forward: p50 {out['quiclb_over_c_forward_p50_us']} us,"
            f" p99 {out['quiclb_over_c_forward_p99_us']} us")
    return out


def run_rss(env: Env, seconds: float, rate: int) -> dict[str, Any]:
    """quiclb's RSS (VmRSS, whole tree) sampled every second while 1M distinct DCIDs stream through it."""
    import subprocess  # noqa: PLC0415 - only this measurement runs the generator in the background

    env.log(f"RSS: quiclb under {COLD_DISTINCT} distinct DCIDs at {rate / 1000:g}k/s for {seconds:g} s")
    sc = Scenario("rss", "", SINGLE_PASS, 100, COLD_DISTINCT, "forward", ["quiclb"])
    load = make_load(env, sc)
    samples: list[tuple[float, int]] = []
    with started(env, sc) as pairs:
        t = pairs[0][0]
        before = rss_bytes(t.pid)
        argv = [str(env.tools["udp_blast"]), "--target", f"{env.host}:{t.port}", *load.blast_args, "--rate",
                str(rate), "--seconds", f"{seconds:g}"]
        if env.load_cpu is not None:
            argv += ["--cpu", str(env.load_cpu)]
        gen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        try:
            while gen.poll() is None and time.monotonic() - t0 < seconds + 10:
                time.sleep(1.0)
                samples.append((round(time.monotonic() - t0, 1), rss_bytes(t.pid)))
        finally:
            if gen.poll() is None:
                gen.kill()
            out, _ = gen.communicate(timeout=10)
    values = [v for _, v in samples]
    # The decode cache fills in the first seconds (65536 entries); growth is judged on the second half.
    middle = values[len(values) // 2] if values else 0
    res: dict[str, Any] = {
        "seconds": seconds, "rate": rate, "distinct_dcids": COLD_DISTINCT, "rss_before_traffic": before,
        "rss_max": max(values, default=0), "rss_end": values[-1] if values else 0,
        "growth_second_half": (values[-1] - middle) if values else 0, "samples": samples,
        "generator": out.strip().splitlines()[-1] if out.strip() else "",
    }
    env.log(f"  RSS max {res['rss_max'] / 2**20:.1f} MiB, growth over the second half "
            f"{res['growth_second_half'] / 2**20:+.1f} MiB")
    return res
