"""Choose the event loop: uvloop when installed (the default), else asyncio's own."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], loop: str = "uvloop") -> T:
    """Run ``main`` on ``loop`` ("uvloop" or "asyncio"); falls back to asyncio without uvloop."""
    if loop == "uvloop":
        try:
            import uvloop  # noqa: PLC0415 - optional dependency
        except ImportError:
            return asyncio.run(main)
        return uvloop.run(main)
    return asyncio.run(main)
