"""``quiclb announce``: the LB's BGP speaker follows its health endpoint (BIRD does the BGP).

A BIRD instance beside each LB holds the VIP (and the shared inside address)
as routes of a ``static`` protocol that starts ``disabled``; BGP exports that
protocol's routes to the top-of-rack routers. This loop polls the LB's
``GET /healthz`` and enables the protocol (announce) after ``rise``
consecutive ``200 ok`` answers, and disables it (withdraw) after ``fall``
consecutive failures — a refused or timed-out request, any other status —
or at once on ``503 draining`` (``SIGUSR1``, see ``quiclb run``). The routers
then drop this LB from their ECMP set.

What each failure mode costs: the LB process dies -> ``fall`` polls
(``fall * interval`` plus at most one timeout); the whole host, or BIRD,
dies -> the routers' BFD session (or, without BFD, the BGP hold timer).
The loop exits on SIGTERM, withdrawing first, so a stopped speaker never
leaves the VIP announced (BIRD stopping closes its sessions anyway).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("quiclb.announce")


@dataclass(frozen=True)
class AnnounceSettings:
    healthz: str  # http://HOST:PORT/healthz of the LB's admin API
    protocol: str  # the BIRD static protocol holding the VIP routes
    birdc: tuple[str, ...] = ("birdc",)  # command prefix, e.g. ("birdc", "-s", "/run/bird/bird.ctl")
    interval: float = 0.2
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2


def probe(url: str, timeout: float) -> str:
    """``ok``, ``draining`` or ``down`` (anything else: refused, timed out, another status)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - an http URL we were given
            return "ok" if resp.status == 200 else "down"
    except urllib.error.HTTPError as exc:
        return "draining" if exc.code == 503 else "down"
    except (OSError, ValueError):
        return "down"


class Announcer:
    """The rise/fall state machine; ``announced`` mirrors the BIRD protocol's state."""

    def __init__(self, settings: AnnounceSettings) -> None:
        self.settings = settings
        self.announced: bool | None = None  # unknown until the first decision
        self._ok = 0
        self._bad = 0

    def observe(self, verdict: str) -> bool | None:
        """Feed one probe verdict; returns the new desired state when it changes, else None."""
        s = self.settings
        if verdict == "ok":
            self._ok, self._bad = self._ok + 1, 0
            want = True if self._ok >= s.rise else None
        else:
            self._ok, self._bad = 0, self._bad + 1
            want = False if verdict == "draining" or self._bad >= s.fall else None
        if want is None or want == self.announced:
            return None
        return want

    def apply(self, announce: bool, reason: str) -> bool:
        verb = "enable" if announce else "disable"
        argv = [*self.settings.birdc, verb, self.settings.protocol]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("%s failed: %s", " ".join(argv), exc)
            return False
        text = (out.stdout + out.stderr).strip().replace("\n", " | ")
        if out.returncode != 0 or "error" in text.lower() or "syntax" in text.lower():
            log.error("%s failed (exit %d): %s", " ".join(argv), out.returncode, text)
            return False
        self.announced = announce
        log.warning("%s %s (%s): %s", "ANNOUNCED" if announce else "WITHDRAWN", self.settings.protocol, reason, text)
        return True


def run_announcer(settings: AnnounceSettings) -> int:
    """Poll until SIGTERM/SIGINT; withdraw on the way out."""
    stopping: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    announcer = Announcer(settings)
    print(f"READY announce protocol={settings.protocol} healthz={settings.healthz}", flush=True)
    next_at = time.monotonic()
    while not stopping:
        verdict = probe(settings.healthz, settings.timeout)
        want = announcer.observe(verdict)
        if want is not None:
            announcer.apply(want, f"healthz {verdict}")
        next_at += settings.interval
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at = max(next_at, time.monotonic() - settings.interval)
    if announcer.announced is not False:
        announcer.apply(False, "speaker stopping")
    return 0
