"""Waiting for a condition with a deadline, instead of sleeping and hoping it holds."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def wait_until(
    check: Callable[[], Awaitable[T]], what: str, timeout_s: float = ..., interval_s: float = ...
) -> T: ...
@overload
async def wait_until(
    check: Callable[[], T], what: str, timeout_s: float = ..., interval_s: float = ...
) -> T: ...
async def wait_until(
    check: Callable[[], Any], what: str, timeout_s: float = 60.0, interval_s: float = 0.05
) -> Any:
    """Call ``check`` (plain or async) until it returns something truthy, and return that.

    Fails the test, naming ``what`` and the last value, once ``timeout_s`` has passed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: still {value!r} after {timeout_s:.0f}s"
        await asyncio.sleep(interval_s)
