"""Retries with exponential backoff and seeded jitter, for calls to services that fail transiently."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class CallFailed(Exception):
    """One failed call. `reason` is a short code (`http_500`, `timeout`, ...); `retryable` says whether
    trying again may help; `detail` is a human-readable line for the log."""

    def __init__(self, reason: str, retryable: bool, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.retryable = retryable
        self.detail = detail


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """The value of the first successful try, or the last failure; `tries` counts every call made."""

    value: T | None
    failure: CallFailed | None
    tries: int


def backoff_delay(retry: int, base_s: float, rng: random.Random) -> float:
    """Delay before retry number `retry` (1, 2, ...): base * 2**(retry-1), times a jitter in [0.5, 1.5)."""
    return base_s * 2 ** (retry - 1) * (0.5 + rng.random())


def call_with_retries(
    call: Callable[[], T],
    *,
    max_retries: int,
    backoff_s: float,
    rng: random.Random,
    label: str,
    give_up: Callable[[], bool] = lambda: False,
) -> Outcome[T]:
    """Call `call` until it returns, raises a non-retryable `CallFailed`, has been retried `max_retries`
    times, or `give_up()` turns true (another call found the service down). `label` names the call in logs."""
    tries = 0
    while True:
        tries += 1
        try:
            return Outcome(call(), None, tries)
        except CallFailed as failure:
            if not failure.retryable or tries > max_retries or give_up():
                return Outcome(None, failure, tries)
            delay = backoff_delay(tries, backoff_s, rng)
            log.info("%s: %s, retry %d/%d in %.2f s", label, failure, tries, max_retries, delay)
            time.sleep(delay)
