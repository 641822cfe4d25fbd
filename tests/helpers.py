"""Waiting in tests: poll for the condition you mean, never sleep for a guessed time.

:func:`until` (threads, processes) and :func:`until_async` (on the event loop) poll ``cond`` until it
returns something truthy, which they return; past ``within`` seconds they raise ``AssertionError``
naming ``what`` and the last error ``cond`` raised, when it raised one of ``retry_on``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _timed_out(within: float, what: str, last: BaseException | None) -> AssertionError:
    detail = f" (last error: {last!r})" if last is not None else ""
    return AssertionError(f"timed out after {within} s waiting for {what}{detail}")


def until(
    cond: Callable[[], T],
    within: float = 60.0,
    what: str = "condition",
    *,
    interval: float = 0.1,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``cond`` every ``interval`` s until it returns a truthy value, and return that.

    Args:
        cond: called with no arguments; falsy means "not yet".
        within: seconds before giving up.
        what: what is awaited, for the failure message.
        interval: seconds between calls.
        retry_on: exceptions of ``cond`` that also mean "not yet" (e.g. ``OSError`` while a server
            starts); any other exception propagates at once.

    Raises:
        AssertionError: ``cond`` stayed falsy for ``within`` seconds.
    """
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while True:
        try:
            value = cond()
        except retry_on as exc:
            last, value = exc, None  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(within, what, last)
        time.sleep(interval)


async def until_async(
    cond: Callable[[], T | Awaitable[T]],
    within: float = 60.0,
    what: str = "condition",
    *,
    interval: float = 0.02,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """:func:`until` on the event loop: ``cond`` may also return an awaitable (awaited each time)."""
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while True:
        try:
            value = cond()
            if inspect.isawaitable(value):
                value = await value
        except retry_on as exc:
            last, value = exc, None
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise _timed_out(within, what, last)
        await asyncio.sleep(interval)
