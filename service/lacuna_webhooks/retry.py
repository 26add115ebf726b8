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
        if requested_seconds is not None:
            floor = min(self.base_delay_seconds, self.max_delay_seconds)
            return min(max(requested_seconds, floor), self.max_delay_seconds)
        exponent = min(attempts - 1, 62)  # 2**62 seconds is beyond any cap
        nominal = self.base_delay_seconds * (2.0**exponent)
        jittered = nominal * (1.0 - JITTER + 2.0 * JITTER * rand())
        return min(jittered, self.max_delay_seconds)
