"""Fixtures for the backend tests: loopback only, every wait bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

#: Wall-clock limit of one in-process scenario, in seconds.
SCENARIO_TIMEOUT = 60.0


@pytest.fixture
def arun() -> Callable[..., Any]:
    """Run a coroutine to completion on a fresh event loop, with a hard timeout."""

    def run(coro: Coroutine[Any, Any, T], timeout: float = SCENARIO_TIMEOUT) -> T:
        return asyncio.run(asyncio.wait_for(coro, timeout))

    return run
