"""The retry schedule: exponential backoff with jitter. Pure: randomness and time are injected."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

JITTER = 0.2


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``max_attempts`` tries in all; the n-th retry waits about ``base * 2**(n-1)`` seconds.

    Each delay is multiplied by a factor drawn uniformly from [0.8, 1.2] and
    then capped at ``max_delay_seconds``.
    """

    max_attempts: int = 10
    base_delay_seconds: float = 5.0
    max_delay_seconds: float = 3600.0

    def delay_seconds(
        self,
        attempts: int,
        *,
        requested_seconds: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """Seconds to wait after attempt ``attempts`` failed, or ``None`` when it was the last.

        ``requested_seconds`` is a peer's own delay (a ``Retry-After`` header,
        via ``RetryLater(delay_seconds=...)``); it replaces the computed delay,
        without jitter, but is held within ``[base_delay_seconds,
        max_delay_seconds]`` (SPEC §6): ``Retry-After: 0``, a date in the past
        or a negative value waits the base delay, never a tight loop; a huge
        one waits the cap.
        """
        if attempts >= self.max_attempts:
            return None
        return self.wait_seconds(attempts, requested_seconds=requested_seconds, rand=rand)

    def wait_seconds(
        self,
        attempts: int,
        *,
        requested_seconds: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """``delay_seconds`` without the budget check: the wait after a failed attempt number
        ``attempts`` (a rate-limited retry that does not spend the budget uses it)."""
        if requested_seconds is not None:
            floor = min(self.base_delay_seconds, self.max_delay_seconds)
            return min(max(requested_seconds, floor), self.max_delay_seconds)
        exponent = min(attempts - 1, 62)  # 2**62 seconds is beyond any cap
        nominal = self.base_delay_seconds * (2.0**exponent)
        jittered = nominal * (1.0 - JITTER + 2.0 * JITTER * rand())
        return min(jittered, self.max_delay_seconds)

    def rate_limit_window_seconds(self) -> float:
        """How long after its creation a delivery's 429s (``RateLimited``) do not spend its
        attempt budget: the longer of the whole nominal retry schedule (the sum of the
        un-jittered delays of ``max_attempts - 1`` retries, each capped) and
        ``max_delay_seconds``. Defaults: 10 attempts, 5 s base, 3600 s cap give 3600 s
        (the schedule itself spans 2555 s). Past it a 429 counts like any failure, so a peer
        answering 429 forever ends the delivery in ``dead`` (docs/delivery.md)."""
        span = 0.0
        for n in range(1, self.max_attempts):
            span += min(self.base_delay_seconds * (2.0 ** min(n - 1, 62)), self.max_delay_seconds)
        return max(span, self.max_delay_seconds)
