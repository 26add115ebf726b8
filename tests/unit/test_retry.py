"""RetryPolicy: exponential backoff with bounded jitter, a cap, and a finite budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lacuna_webhooks.retry import RetryPolicy

POLICY = RetryPolicy(max_attempts=10, base_delay_seconds=5.0, max_delay_seconds=3600.0)


def fixed(value: float):
    return lambda: value


@pytest.mark.parametrize(("attempts", "expected"), [(1, 5.0), (2, 10.0), (3, 20.0), (4, 40.0)])
def test_schedule_doubles_from_the_base(attempts: int, expected: float) -> None:
    """Without jitter (rand=0.5 is the midpoint) the n-th retry waits base * 2**(n-1)."""
    assert POLICY.delay_seconds(attempts, rand=fixed(0.5)) == pytest.approx(expected)


def test_jitter_extremes_are_plus_minus_twenty_percent() -> None:
    """rand=0 gives 0.8x the nominal delay, rand->1 gives 1.2x."""
    assert POLICY.delay_seconds(3, rand=fixed(0.0)) == pytest.approx(16.0)
    assert POLICY.delay_seconds(3, rand=fixed(0.999999)) == pytest.approx(24.0, rel=1e-5)


@given(attempts=st.integers(1, 9), r=st.floats(0.0, 1.0, exclude_max=True))
def test_jitter_stays_within_bounds(attempts: int, r: float) -> None:
    """Every delay lies in [0.8, 1.2] x nominal, and never above the cap."""
    delay = POLICY.delay_seconds(attempts, rand=fixed(r))
    assert delay is not None
    nominal = 5.0 * 2 ** (attempts - 1)
    assert min(0.8 * nominal, 3600.0) - 1e-9 <= delay <= min(1.2 * nominal, 3600.0) + 1e-9


def test_delay_is_capped() -> None:
    """A late retry waits max_delay_seconds, not base * 2**n."""
    long = RetryPolicy(max_attempts=100, base_delay_seconds=5.0, max_delay_seconds=3600.0)
    assert long.delay_seconds(9, rand=fixed(0.5)) == pytest.approx(1280.0)  # under the cap
    assert long.delay_seconds(11, rand=fixed(0.5)) == 3600.0  # nominal 5120
    policy = RetryPolicy(max_attempts=100, base_delay_seconds=5.0, max_delay_seconds=60.0)
    assert policy.delay_seconds(30, rand=fixed(0.9)) == 60.0
    assert policy.delay_seconds(99, rand=fixed(0.0)) == 60.0


def test_none_after_the_last_attempt() -> None:
    """When attempt number max_attempts failed there is no next try."""
    assert POLICY.delay_seconds(9, rand=fixed(0.5)) is not None
    assert POLICY.delay_seconds(10, rand=fixed(0.5)) is None
    assert POLICY.delay_seconds(11, rand=fixed(0.5)) is None
    assert RetryPolicy(max_attempts=1).delay_seconds(1) is None


def test_requested_delay_replaces_the_schedule() -> None:
    """A handler's own delay (Retry-After) is used as is, without jitter."""
    assert POLICY.delay_seconds(1, requested_seconds=42.5, rand=fixed(0.0)) == 42.5


def test_requested_delay_is_capped() -> None:
    """A huge Retry-After is capped at max_delay_seconds."""
    assert POLICY.delay_seconds(1, requested_seconds=10_000_000) == 3600.0


@pytest.mark.parametrize("requested", [0.0, -5.0, 0.001, 4.999])
def test_requested_delay_never_goes_below_the_base_delay(requested: float) -> None:
    """Retry-After: 0, a past date (negative) or anything short waits base_delay_seconds."""
    assert POLICY.delay_seconds(1, requested_seconds=requested) == 5.0
    assert POLICY.delay_seconds(7, requested_seconds=requested) == 5.0


def test_requested_delay_floor_respects_a_cap_below_the_base() -> None:
    """Should the cap sit below the base delay, the cap still wins (no delay above it)."""
    policy = RetryPolicy(base_delay_seconds=10.0, max_delay_seconds=2.0)
    assert policy.delay_seconds(1, requested_seconds=0.0) == 2.0


@given(
    requested=st.floats(allow_nan=False, allow_infinity=True),
    base=st.floats(0.001, 100.0),
    extra=st.floats(0.0, 10_000.0),
)
def test_requested_delay_always_within_base_and_cap(
    requested: float, base: float, extra: float
) -> None:
    """Whatever the peer asks, the delay lies in [base_delay_seconds, max_delay_seconds]."""
    policy = RetryPolicy(base_delay_seconds=base, max_delay_seconds=base + extra)
    delay = policy.delay_seconds(1, requested_seconds=requested)
    assert delay is not None
    assert base <= delay <= base + extra


def test_requested_delay_does_not_extend_the_budget() -> None:
    """After the last attempt a requested delay still yields None (the delivery is dead)."""
    assert POLICY.delay_seconds(10, requested_seconds=1.0) is None


@given(attempts=st.integers(1, 10_000), r=st.floats(0.0, 1.0, exclude_max=True))
def test_huge_attempt_numbers_do_not_overflow(attempts: int, r: float) -> None:
    """Any attempt number yields a finite delay within [0, cap], or None past the budget."""
    policy = RetryPolicy(max_attempts=20_000, base_delay_seconds=0.5, max_delay_seconds=7200.0)
    delay = policy.delay_seconds(attempts, rand=fixed(r))
    assert delay is not None
    assert 0.0 <= delay <= 7200.0
