"""``quiclb demo-scaleout`` (``make demo-scaleout``): the issue-10 topology with real QUIC clients, and its promises.

Builds the namespaces (client, router with BIRD and kernel ECMP, three LB
hosts each with quiclb, BIRD and ``quiclb announce``, the backends), runs
:func:`~quiclb_harness.scaleout.acceptance.run_via_lb` and the DSR variant,
prints which promises held and writes the measurements as JSON (``--out``;
``make demo-scaleout`` keeps them in ``bench/reference/scaleout.json``, the
README's numbers) with the commit they ran on. Needs root.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quiclb_harness.scaleout.acceptance import run_direct, run_hold_timer, run_via_lb
from quiclb_harness.scaleout.bird import Timers
from quiclb_harness.scaleout.netns import have_root
from quiclb_harness.scaleout.scenarios import Results

CLIENTS, INTERVAL = 100, 0.5


def promises(via_lb: Results, direct: Results) -> list[tuple[bool, str]]:
    out: list[tuple[bool, str]] = []
    health_ok = all(all(row.values()) and len(row) == 3 for row in via_lb.health.values()) and len(via_lb.health) == 3
    out.append((health_ok, f"every LB reports every backend healthy, its own probes answered (each probes from "
                           f"its own address): { {lb: sum(row.values()) for lb, row in via_lb.health.items()} }"))
    end_ok = all(all(row.values()) for row in via_lb.health_end.values()) and sum(via_lb.health_flips.values()) == 0
    out.append((end_ok, f"after every step, every live LB still sees every backend healthy; health flips "
                        f"{via_lb.health_flips}"))
    out.append((len(via_lb.spread) == 3 and all(n > 0 for n in via_lb.spread.values()),
                f"W({CLIENTS}, {INTERVAL} s) spread over all three LBs by ECMP: client datagrams {via_lb.spread}"))
    out.append((via_lb.ngtcp2.get("ok") == via_lb.ngtcp2.get("runs"),
                f"ngtcp2's client through the VIP: {via_lb.ngtcp2.get('ok')}/{via_lb.ngtcp2.get('runs')} "
                f"downloads, served by {via_lb.ngtcp2.get('served_by')}"))
    for key, label in (("host", "LB host 2 dead (frozen, then kill -9)"), ("process", "LB 4's quiclb kill -9")):
        k = via_lb.kill.get(key, {})
        ok = (k.get("withdrawal_ms") is not None and k.get("downloads_completed") == k.get("downloads")
              and k.get("new_handshakes") == 0)
        out.append((ok, f"{label} mid-download: withdrawn by {k.get('mechanism')} in {k.get('withdrawal_ms')} ms, "
                        f"{k.get('datagrams_lost')} datagrams reached it meanwhile (lost, recovered by QUIC), "
                        f"{k.get('downloads_completed')}/{k.get('downloads')} downloads finished, "
                        f"{k.get('new_handshakes')} new handshakes"))
    hs = via_lb.handshakes
    total = sum(h["total"] for h in hs.values())
    completed = sum(h["completed"] for h in hs.values())
    out.append((total > 0 and completed == total and all(h["misplaced"] == 0 for h in hs.values()),
                f"handshakes across the ECMP changes: {completed}/{total} completed, "
                f"{sum(h['in_flight_at_change'] for h in hs.values())} in flight at a change, "
                f"{sum(h['retried'] for h in hs.values())} retried, {sum(h['slow'] for h in hs.values())} "
                f"recovered by retransmission, {sum(h['misplaced'] for h in hs.values())} off the keyed Maglev"))
    d = via_lb.drain
    out.append((d.get("withdrawal_ms") is not None and d.get("rx_after_withdrawal") == 0
                and d.get("ingress_after_withdrawal") == 0 and d.get("exit_code") == 0,
                f"drain of LB 3 (SIGUSR1): withdrawn in {d.get('withdrawal_ms')} ms, "
                f"{d.get('ingress_after_withdrawal')} datagrams after it, exited {d.get('exit_code')} "
                f"after {d.get('stopped_after_s')} s"))
    a = via_lb.add
    out.append((a.get("rx_client_datagrams", 0) > 0,
                f"a 4th LB joined and took traffic: {a.get('rx_client_datagrams')} client datagrams, "
                f"{a.get('fallback_routed')} Initials"))
    w = via_lb.workload
    out.append((w.get("lost") == 0, f"no connection lost through it all: {w.get('summary')}"))
    dw = direct.workload
    dsr_ok = (dw.get("lost") == 0 and all(n > 0 for n in direct.spread.values())
              and all(c["tx_to_client"] == 0 for c in direct.counters.values())
              and all(all(row.values()) for row in direct.health.values()))
    out.append((dsr_ok, f"direct (DSR, IPv4): replies from the VIP straight to the clients over 3 LBs, "
                        f"every LB sees every backend healthy; {dw.get('summary')}"))
    return out


def _commit() -> str:
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        rev = subprocess.run([git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run([git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def run_scaleout_demo(out: Path | None = None, workdir: Path | None = None, keep: bool = False) -> int:
    reason = have_root()
    if reason is not None:
        print(f"quiclb demo-scaleout: {reason}", file=sys.stderr)
        return 1
    logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic's per-connection INFO lines drown the report
    directory = workdir or Path(tempfile.mkdtemp(prefix="quiclb-scaleout-"))
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        via_lb = run_via_lb(directory, clients=CLIENTS, interval=INTERVAL, progress=print)
        direct = run_direct(directory, progress=print)
        hold = run_hold_timer(directory, progress=print)
    finally:
        if not keep and workdir is None:
            shutil.rmtree(directory, ignore_errors=True)
    held = promises(via_lb, direct)
    print()
    for ok, text in held:
        print(f"[{'PASS' if ok else 'FAIL'}] {text}")
    hk = hold.kill.get("host", {})
    info = (f"without BFD (hold {Timers().hold} s): LB host withdrawn by {hk.get('mechanism')} in "
            f"{hk.get('withdrawal_ms')} ms, {hk.get('datagrams_lost')} datagrams lost; "
            f"{hold.workload.get('summary')}")
    print(f"[INFO] {info}")
    timers = Timers()
    record: dict[str, Any] = {
        "commit": _commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "seconds": round(time.monotonic() - started, 1),
        "timers": {"bgp_hold_s": timers.hold, "bgp_keepalive_s": timers.keepalive,
                   "bfd_interval_ms": timers.bfd_interval_ms, "bfd_multiplier": timers.bfd_multiplier,
                   "announce_interval_s": 0.1, "announce_fall": 2},
        "via_lb": via_lb.as_json(), "direct": direct.as_json(), "hold_timer_only": hold.as_json(),
        "promises": [{"held": ok, "text": text} for ok, text in held],
        "info": [info],
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"\nmeasurements: {out} (commit {record['commit']})")
    passed = all(ok for ok, _ in held)
    print(f"{sum(ok for ok, _ in held)}/{len(held)} promises held in {record['seconds']} s")
    return 0 if passed else 1
