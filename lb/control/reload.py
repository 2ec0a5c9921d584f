"""The reload transaction: load -> validate -> build -> swap, or keep the running configuration.

:class:`ConfigReloader` owns the current :class:`LbConfig`, a lock (one reload
at a time) and the reload counters. What a reload *does* to the process is the
target's (:class:`ReloadTarget`): ``prepare`` opens what the new configuration
needs and builds its tables — it may fail or await, and nothing visible
changes — and ``commit`` swaps everything at once, synchronously.

Rules (issue 12 items 3 and 4, issue 13 item 5):

* any exception in a reload — a bad value, a missing file, and also a
  ``RecursionError`` from a hostile TOML or a ``MemoryError`` — is a rejected
  reload: counted in ``rejected``, remembered in ``last_reload_error``, logged
  in one line, answered with ``ReloadResult(ok=False)`` (422 from the admin
  API); the running configuration stays;
* a reload requested before the process finished starting (a SIGHUP during a
  slow start) waits and is applied right after the start;
* a SIGHUP's reload runs as a task whose reference is kept and whose outcome
  is logged: never "Task exception was never retrieved".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lb.control.config import LbConfig, load_config
from lb.control.snapshot import ReloadResult
from lb.core.addresses import normalize_address
from lb.errors import ConfigError

log = logging.getLogger("quiclb")

#: Longest reload error kept and logged: a message is one line, not a dump of the file.
MAX_ERROR_CHARS = 500


class ReloadTarget(Protocol):
    async def prepare(self, old: LbConfig, new: LbConfig) -> Callable[[], None]:
        """Phase 1: open and build for ``new`` (may raise: then nothing changed); returns the commit."""


@dataclass(frozen=True)
class ReloadStats:
    reloads: int
    rejected: int
    last_reload_error: str | None


def describe_error(exc: BaseException) -> str:
    """One line naming the problem: the message of our own errors, else the exception type too."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, (ConfigError, OSError, ValueError)) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def check_restart_only(old: LbConfig, new: LbConfig) -> None:
    """Settings a running process cannot change: refuse the reload rather than pretend."""
    for key, before, after in (
        ("lb.inside", normalize_address(old.lb.inside), normalize_address(new.lb.inside)),
        ("lb.admin", old.lb.admin, new.lb.admin),
    ):
        if before != after:
            raise ConfigError(f"{old.path}: {key}: changing it needs a restart (running with {before})")


class ConfigReloader:
    """The current configuration and the transaction that replaces it."""

    def __init__(self, config: LbConfig, target: ReloadTarget, *,
                 load: Callable[[Path], LbConfig] = load_config, lock: asyncio.Lock | None = None) -> None:
        self.config = config
        self._target = target
        self._load = load
        # The app passes the table updater's lock: a health update built from the old configuration
        # must never be installed after the new one.
        self._lock = lock if lock is not None else asyncio.Lock()
        self._started = asyncio.Event()
        self._tasks: set[asyncio.Task[ReloadResult]] = set()
        self.reloads = 0
        self.rejected = 0
        self.last_reload_error: str | None = None

    def mark_started(self) -> None:
        """The process is serving: reloads requested during the start may run now."""
        self._started.set()

    async def reload(self) -> ReloadResult:
        """Load, validate, build and swap the whole configuration; on any error keep the running one."""
        await self._started.wait()
        async with self._lock:
            old = self.config
            try:
                # In a thread: parsing a large file takes seconds of tomllib, and a thread gives
                # the GIL back to the datapath every switch interval (5 ms) meanwhile.
                new = await asyncio.to_thread(self._load, old.path)
                check_restart_only(old, new)
                commit = await self._target.prepare(old, new)
                commit()
            except Exception as exc:  # any failure is a rejected reload, by contract (RecursionError too)
                message = describe_error(exc)
                self.rejected += 1
                self.last_reload_error = message
                log.error("reload rejected, keeping config version %d: %s", old.version, message)
                return ReloadResult(False, message, old.version, old.digest)
            self.config = new
            self.reloads += 1
            self.last_reload_error = None
            log.info("reloaded: config version %d digest %s", new.version, new.digest[:16])
            return ReloadResult(True, "reloaded", new.version, new.digest)

    def request(self) -> asyncio.Task[ReloadResult]:
        """Start a reload in the background (SIGHUP); the task is kept and its outcome logged."""
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[ReloadResult]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # reload() catches every Exception; this is a BaseException or a bug in the logging itself.
            log.error("reload task failed: %s", describe_error(task.exception()))  # type: ignore[arg-type]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except asyncio.CancelledError:
                pass

    def stats(self) -> ReloadStats:
        return ReloadStats(self.reloads, self.rejected, self.last_reload_error)
