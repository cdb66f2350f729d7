"""How the daemon retries its broker calls: one tenacity policy, one backoff.

Sends and transactions retry until they pass (a tick is never dropped: an outage holds
the partition back instead); the caller decides which errors are worth another try and
may stop after a few (a commit does: the next commit covers the same offsets).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

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


def retrying(
    what: str, retry_on: Callable[[BaseException], bool], attempts: int | None = None
) -> AsyncRetrying:
    """A policy that calls again while ``retry_on(error)`` holds, waiting BACKOFF_S between
    tries, and raises the last error when that fails or after ``attempts`` tries (no limit
    by default). Use: ``await retrying("commit", is_kafka_error)(consumer.commit, offsets)``.
    """
    return AsyncRetrying(
        retry=retry_if_exception(retry_on),
        wait=wait_chain(*(wait_fixed(s) for s in BACKOFF_S)),
        stop=stop_never if attempts is None else stop_after_attempt(attempts),
        before_sleep=lambda state: _log_retry(what, state),
        reraise=True,
    )


def _log_retry(what: str, state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    logger.warning(
        "%s failed (%s: %s); try %d in %.2fs",
        what,
        type(error).__name__,
        error,
        state.attempt_number + 1,
        delay,
    )
