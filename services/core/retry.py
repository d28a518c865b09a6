"""Retry a start-up step with capped, jittered exponential backoff until a deadline."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_RETRY_DELAY_SECONDS = 0.25
MAX_RETRY_DELAY_SECONDS = 5.0


def retry_until_deadline(
    attempt: Callable[[], T],
    *,
    what: str,
    timeout_seconds: float,
    is_retryable: Callable[[Exception], bool],
    log_fields: dict[str, Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``attempt`` until it returns, retrying errors that ``is_retryable`` accepts.

    Each retry is logged at warning with the attempt number and the delay.
    The delay doubles from 0.25 s up to 5 s, with jitter so that several
    processes do not retry in step.

    Raises:
        Exception: the error of the last attempt, when it is not retryable or
            when ``timeout_seconds`` have passed.
    """
    deadline = time.monotonic() + timeout_seconds
    delay = FIRST_RETRY_DELAY_SECONDS
    number = 0
    while True:
        number += 1
        try:
            result = attempt()
        except Exception as error:
            remaining = deadline - time.monotonic()
            if not is_retryable(error) or remaining <= 0:
                raise
            pause = min(delay * (0.5 + random.random() / 2), remaining)
            logger.warning(
                "retrying: %s (attempt %d, next in %.2fs): %s",
                what,
                number,
                pause,
                error,
                extra={
                    **(log_fields or {}),
                    "attempt": number,
                    "retry_in_seconds": round(pause, 3),
                    "cause": getattr(error, "cause", type(error).__name__),
                    "error": str(error),
                },
            )
            sleep(pause)
            delay = min(delay * 2, MAX_RETRY_DELAY_SECONDS)
            continue
        if number > 1:
            logger.info("connected: %s (after %d attempts)", what, number, extra={"attempt": number})
        return result
