"""One retry policy for every loop that tries again, on `tenacity <https://tenacity.readthedocs.io>`_.

The delay before retry ``n`` (``n >= 1``: the first retry, after the first failure) is

    ``min(max_s, first_s * factor ** (n - 1)) * U(1 - jitter, 1)``

capped exponential backoff with jitter ("equal jitter" when ``jitter = 0.5``; Brooker, "Exponential
Backoff And Jitter", AWS Architecture Blog, 2015). Jitter only shortens a delay, so ``max_s`` stays
a true upper bound, and peers that failed together do not retry in lock-step. :meth:`Backoff.delay`
is that formula, used both by the retry loops here and by bookkeeping that only needs a delay
(a failing peer excluded from routing, :meth:`potluck.overlay.service.OverlayService.record_failure`).

A :class:`RetryPolicy` adds the bounds (``attempts``, ``deadline_s``), which exceptions are worth
another attempt (``retry_on``; anything else propagates at once) and a log line per retry. When it
gives up, the last exception is re-raised as it was (``reraise=True``), never wrapped in
``tenacity.RetryError``::

    for attempt in policy.retrying(log, "joining the group"):
        with attempt:
            join()

    async for attempt in policy.async_retrying(log, "dialling the bootstrap peer"):
        with attempt:
            await dial()
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import tenacity
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from potluck.errors import NetworkError

__all__ = ["Backoff", "RetryPolicy"]


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter (the formula in the module docstring).

    Attributes:
        first_s: delay before the first retry, in seconds (before jitter).
        max_s: cap on every delay, in seconds.
        factor: growth per retry (1.0: a fixed interval of ``first_s``).
        jitter: fraction in ``[0, 1]`` a delay may be shortened by at random (0: none).
    """

    first_s: float = 1.0
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.first_s < 0 or self.max_s < 0 or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"invalid backoff {self}")

    def delay(self, n: int) -> float:
        """Seconds to wait before retry ``n`` (``n >= 1``), after ``n`` consecutive failures."""
        exponent = max(0, n - 1)
        # Past the cap the power only grows: stop computing it (no float overflow for large n).
        base = self.max_s if exponent > 1023 else min(self.max_s, self.first_s * self.factor**exponent)
        return base * (1.0 - self.jitter * random.random())


class _Wait(wait_base):
    """tenacity's view of :meth:`Backoff.delay`."""

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return self.backoff.delay(retry_state.attempt_number)


@dataclass(frozen=True)
class RetryPolicy:
    """How often, how long and on what to try again.

    Attributes:
        backoff: the delays between attempts.
        attempts: attempts in all, the first included (``None``: no bound).
        deadline_s: no retry starts later than this many seconds after the first attempt began
            (the wait before it counts); ``None``: no bound. Each attempt keeps its own deadline.
        retry_on: exceptions worth another attempt; any other propagates at once.
    """

    backoff: Backoff = field(default_factory=Backoff)
    attempts: int | None = None
    deadline_s: float | None = None
    retry_on: tuple[type[BaseException], ...] = (NetworkError, TimeoutError)

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("a retry policy needs at least one attempt")

    def _stop(self) -> stop_base:
        stop: stop_base = tenacity.stop_never
        if self.attempts is not None:
            stop = stop | tenacity.stop_after_attempt(self.attempts)
        if self.deadline_s is not None:
            stop = stop | tenacity.stop_before_delay(self.deadline_s)
        return stop

    def _options(self, log: logging.Logger, what: str, level: int) -> dict[str, Any]:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            name = type(exc).__name__
            log.log(level, "%s failed (%s: %s); retry %d in %.1f s", what, name, exc, state.attempt_number, wait)

        return {
            "stop": self._stop(),
            "wait": _Wait(self.backoff),
            "retry": tenacity.retry_if_exception_type(self.retry_on),
            "before_sleep": before_sleep,
            "reraise": True,
        }

    def retrying(self, log: logging.Logger, what: str, *, level: int = logging.INFO) -> tenacity.Retrying:
        """A blocking retry loop (``for attempt in ...: with attempt: ...``).

        Args:
            log: where each retry is logged (the caller's module logger).
            what: the operation, for the log line ("joining the tensor-parallel group").
            level: log level of the retry lines.
        """
        return tenacity.Retrying(**self._options(log, what, level))

    def async_retrying(
        self,
        log: logging.Logger,
        what: str,
        *,
        level: int = logging.INFO,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
    ) -> tenacity.AsyncRetrying:
        """An async retry loop (``async for attempt in ...: with attempt: ...``).

        Args:
            log / what / level: as for :meth:`retrying`.
            sleep: the async sleep between attempts; by default tenacity's, which runs on asyncio
                or trio. Code in the overlay's trio thread passes ``anyio.sleep``.
        """
        options = self._options(log, what, level)
        if sleep is not None:
            options["sleep"] = sleep
        return tenacity.AsyncRetrying(**options)
