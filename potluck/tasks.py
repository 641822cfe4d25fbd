"""One owner for background tasks (structured concurrency on top of asyncio).

A :class:`TaskOwner` is an async context manager: tasks started through it are cancelled and
awaited when it exits, in the reverse order of starting. A task that fails records its
exception in :attr:`TaskOwner.failure` and sets :attr:`TaskOwner.failed`, so whoever owns the
owner (the Node) can shut down instead of running on half-broken.

:class:`Failure` carries an exception from a producer to its consumer through a queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, NoReturn

log = logging.getLogger(__name__)

RECANCEL_S = 1.0  # seconds a task has to end after a cancel before it is cancelled again


class Failure:
    """An exception handed from a producer to its consumer through a queue or channel.

    A producer (a worker thread, a task, the overlay's trio thread) puts ``Failure(exc)`` where its
    results go; the consumer, on taking one, raises it (:meth:`reraise`) at that point of the
    stream, after every item produced before it.

    Attributes:
        exc: the exception the producer raised.
    """

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def reraise(self) -> NoReturn:
        """Raise :attr:`exc` (its traceback from the producer's side is kept)."""
        raise self.exc

    def __repr__(self) -> str:
        return f"Failure({self.exc!r})"


class TaskOwner:
    """Starts, tracks, cancels and awaits background tasks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: list[asyncio.Task[Any]] = []
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task owned by this object."""
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        task.add_done_callback(self._on_done)
        self._tasks.append(task)
        return task

    async def start_ready(
        self,
        fn: Callable[[asyncio.Future[None]], Awaitable[Any]],
        name: str,
        timeout: float | None = None,  # noqa: ASYNC109 (bounds only the wait for readiness)
    ) -> asyncio.Task[Any]:
        """Start ``fn(ready)`` and wait until it calls ``ready.set_result(None)`` (trio's
        ``task_status.started()``).

        Raises:
            whatever the task raised before it became ready; TimeoutError past ``timeout``.
        """
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = self.start(fn(ready), name)  # type: ignore[arg-type]
        done, _ = await asyncio.wait({ready, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            return task
        if task in done:
            task.result()  # re-raises its error
            raise RuntimeError(f"task {name} ended before it was ready")
        task.cancel()
        raise TimeoutError(f"task {name} not ready after {timeout} s")

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.failure is None:
            log.error("background task %s failed: %s", task.get_name(), exc, exc_info=exc)
            self.failure = exc
            self.failed.set()

    async def __aenter__(self) -> TaskOwner:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in reversed(self._tasks):
            task.cancel()
        for task in reversed(self._tasks):
            # A task may swallow its cancellation (on 3.11 ``asyncio.wait_for`` does so when the
            # cancel races with the awaited result): cancel it again until it ends, rather than
            # hang the shutdown. A CancelledError raised here is ours and propagates.
            while not (await asyncio.wait({task}, timeout=RECANCEL_S))[0]:
                log.warning("task %s ignored its cancellation; cancelling it again", task.get_name())
                task.cancel()
        self._tasks.clear()
