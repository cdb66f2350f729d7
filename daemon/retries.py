"""How the daemon retries its broker calls: one tenacity policy, one backoff.

Sends and transactions retry until they pass (a tick is never dropped: an outage holds
the partition back instead); the caller decides which errors are worth another try and
may stop after a few (a commit does: the next commit covers the same offsets).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_never,
    wait_chain,
    wait_fixed,
)

logger = logging.getLogger(__name__)

# Quick after a blip, gentle on a long outage: 0.1, 0.25, 0.5, 1 s, then every 2 s.
BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)

T = TypeVar("T")


async def call_with_retries(
    what: str,
    retry_on: Callable[[BaseException], bool],
    fn: Callable[..., Awaitable[T]],
    *args: Any,
    attempts: int | None = None,
) -> T:
    """``await fn(*args)``, called again while it fails with an error ``retry_on`` accepts,
    waiting BACKOFF_S between tries; the last error is raised when ``retry_on`` refuses it
    or after ``attempts`` tries (no limit by default).

    The first try runs bare and tenacity takes over only once it failed: its bookkeeping
    costs ~23 µs a call, and the daemon sends several times per batch, nearly always
    successfully.
    """
    try:
        return await fn(*args)
    except BaseException as error:
        if not retry_on(error) or attempts == 1:
            raise
        _log_retry(what, error, next_try=2, delay=BACKOFF_S[0])
    await asyncio.sleep(BACKOFF_S[0])
    policy = AsyncRetrying(
        retry=retry_if_exception(retry_on),
        wait=wait_chain(*(wait_fixed(s) for s in BACKOFF_S[1:])),
        stop=stop_never if attempts is None else stop_after_attempt(attempts - 1),
        before_sleep=lambda state: _log_state(what, state),
        reraise=True,
    )
    return await policy(fn, *args)


def _log_state(what: str, state: RetryCallState) -> None:
    """tenacity's hook before each wait; its tries are counted from the second."""
    error = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    _log_retry(what, error, next_try=state.attempt_number + 2, delay=delay)


def _log_retry(what: str, error: BaseException | None, *, next_try: int, delay: float) -> None:
    logger.warning(
        "%s failed (%s: %s); try %d in %.2fs", what, type(error).__name__, error, next_try, delay
    )
