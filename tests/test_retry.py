"""potluck.retry: the backoff formula, the bounds, what is retried."""

from __future__ import annotations

import logging
import time

import pytest

from potluck.errors import ConnectError, RequestError
from potluck.retry import Backoff, RetryPolicy

log = logging.getLogger(__name__)


def test_delays_double_up_to_the_cap_and_jitter_only_shortens() -> None:
    exact = Backoff(first_s=1.0, max_s=60.0, jitter=0.0)
    assert [exact.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert exact.delay(10_000) == 60.0
    jittered = Backoff(first_s=1.0, max_s=60.0, jitter=0.2)
    for n in range(1, 10):
        assert 0.8 * exact.delay(n) <= jittered.delay(n) <= exact.delay(n)
    with pytest.raises(ValueError):
        Backoff(jitter=1.5)


def test_attempts_bound_and_last_error_reraised(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    calls = []
    policy = RetryPolicy(Backoff(first_s=0.001, jitter=0.0), attempts=3)
    with pytest.raises(ConnectError, match="3"):
        for attempt in policy.retrying(log, "dialling"):
            with attempt:
                calls.append(1)
                raise ConnectError(f"try {len(calls)}")
    assert len(calls) == 3
    assert caplog.text.count("dialling failed (ConnectError") == 2


def test_other_errors_are_not_retried() -> None:
    calls = []
    with pytest.raises(RequestError):
        for attempt in RetryPolicy(Backoff(first_s=0.001), attempts=5).retrying(log, "x"):
            with attempt:
                calls.append(1)
                raise RequestError("bad request")
    assert len(calls) == 1


async def test_async_deadline_stops_before_sleeping_past_it() -> None:
    calls = []
    policy = RetryPolicy(Backoff(first_s=0.2, factor=1.0, jitter=0.0), deadline_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        async for attempt in policy.async_retrying(log, "x"):
            with attempt:
                calls.append(1)
                raise TimeoutError
    assert len(calls) in (2, 3)  # at 0, 0.2 and 0.4 s on an idle machine; never one past 0.5 s
    assert time.monotonic() - t0 < 0.5
