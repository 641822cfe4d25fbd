"""The one crossing between asyncio (the node) and trio (py-libp2p).

py-libp2p is trio-based; the node is asyncio. A :class:`TrioThread` runs one trio event loop in
a dedicated thread, for the lifetime of an ``async with`` block on the asyncio side. Calls cross
in both directions:

* asyncio -> trio: :meth:`TrioThread.call` runs an async function as a task in the trio
  thread's nursery and awaits its result from asyncio; cancelling the asyncio awaiter cancels the
  trio task. :meth:`TrioThread.stream` runs a trio async generator and hands its items to asyncio
  through a bounded ``asyncio.Queue`` (the trio side waits while the queue is full: backpressure).
* trio -> asyncio: :meth:`TrioThread.call_asyncio` runs a coroutine function on the node's loop
  (``asyncio.run_coroutine_threadsafe``) and awaits it from trio; cancelling the trio side
  cancels the asyncio task. :meth:`TrioThread.iterate_asyncio` pulls items of an asyncio async
  iterator one at a time (pull-based, so it is bounded by construction).

Each method asserts that it is called from the thread it belongs to: a wrong-thread call is a
programming error, not a runtime condition. This is the only module that imports trio; the other
overlay modules run inside the trio thread through ``anyio`` (which drives trio natively).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

import trio

from potluck.errors import ClosedError
from potluck.tasks import Failure

log = logging.getLogger(__name__)

T = TypeVar("T")

_END = object()
STOP_TIMEOUT_S = 15.0  # how long stopping waits for the trio thread before abandoning it


class TrioThread:
    """A trio event loop in its own thread, owned by an asyncio ``async with`` block.

    Args:
        name: thread name (shows in ``threading.enumerate()`` and debuggers).
        main: optional ``async def main(ready)`` run in the trio thread for the whole lifetime of
            the block; it must call ``ready()`` once it is up (trio's ``task_status.started``) and
            return when cancelled. Everything it opens is torn down before ``__aexit__`` returns.
        start_timeout: seconds to wait for the thread and ``main`` to become ready.

    Raises (``__aenter__``):
        whatever ``main`` raised before it became ready; ``TimeoutError`` past ``start_timeout``.
    """

    def __init__(
        self,
        name: str,
        main: Callable[[Callable[[], None]], Awaitable[None]] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self._main = main
        self._start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._done: asyncio.Future[None] | None = None
        self._closing = False
        self.crashed = asyncio.Event()  # set (on the asyncio loop) when the trio side died after start
        self.failure: BaseException | None = None

    # ----------------------------------------------------------------- thread checks
    def in_trio_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def _assert_asyncio_side(self) -> asyncio.AbstractEventLoop:
        assert not self.in_trio_thread(), "called from the trio thread; use the trio-side API"
        loop = asyncio.get_running_loop()
        assert loop is self._loop, "called from another asyncio loop than the one that started the bridge"
        return loop

    def assert_trio_side(self) -> None:
        """Assert that the caller runs in this bridge's trio thread."""
        assert self.in_trio_thread(), "called outside the overlay's trio thread"

    # ----------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> TrioThread:
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        self._thread = threading.Thread(target=self._thread_main, name=self.name, daemon=True)
        self._thread.start()
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._ready), self._start_timeout)
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._closing = True
        token, stop = self._token, self._stop
        if token is not None and stop is not None:
            try:
                token.run_sync_soon(stop.set)
            except trio.RunFinishedError:
                pass
        assert self._done is not None
        # Shielded: a Ctrl-C arriving now must not leave the thread running behind our back. Bounded:
        # should py-libp2p's close ever hang inside the trio thread (a daemon), the node still exits.
        # (The stop hang once seen in the test suite was an asyncio task that swallowed its cancel,
        # fixed in TaskOwner; this bound is the safety net for the trio side.)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):  # not wait_for: it can swallow our own cancel
                await asyncio.shield(self._done)
        except TimeoutError:
            log.warning("the overlay thread %s did not stop within %.0f s; abandoning it", self.name, STOP_TIMEOUT_S)
            return
        if self._thread is not None:
            self._thread.join()

    def _thread_main(self) -> None:
        loop = self._loop
        assert loop is not None and self._done is not None
        done = self._done
        try:
            trio.run(self._trio_main)
        except BaseException as exc:  # the thread must always report back
            inner = getattr(exc, "exceptions", None)  # a (Base)ExceptionGroup of one: unwrap it
            while isinstance(inner, tuple) and len(inner) == 1:
                exc, inner = inner[0], getattr(inner[0], "exceptions", None)
            self.failure = exc
            if not self._ready.done():
                self._ready.set_exception(exc)
            else:
                log.error("overlay trio thread crashed: %r", exc, exc_info=exc)
                loop.call_soon_threadsafe(self.crashed.set)
        finally:
            if not self._ready.done():
                self._ready.set_exception(ClosedError("the overlay thread stopped before it was ready"))

            def finish() -> None:
                if not done.done():
                    done.set_result(None)

            try:
                loop.call_soon_threadsafe(finish)
            except RuntimeError:  # loop already closed: nobody is waiting any more
                pass

    async def _trio_main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._main is not None:
                await nursery.start(self._run_main)
            if not self._ready.done():
                self._ready.set_result(None)
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        self._nursery = None

    async def _run_main(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self._main is not None
        await self._main(lambda: task_status.started())

    # ----------------------------------------------------------------- asyncio -> trio
    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` in the trio thread and return its result to asyncio.

        Raises:
            whatever ``fn`` raised; ``ClosedError`` when the bridge is shut down.
            Cancelling the awaiting asyncio task cancels the trio task (and waits for it).
        """
        loop = self._assert_asyncio_side()
        fut: asyncio.Future[T] = loop.create_future()
        scope_box: list[trio.CancelScope] = []

        def deliver(result: Any) -> None:
            if fut.done():
                return
            if isinstance(result, Failure):
                fut.set_exception(result.exc)
            else:
                fut.set_result(result)

        async def task() -> None:
            with trio.CancelScope() as scope:
                scope_box.append(scope)
                try:
                    result: Any = await fn(*args)
                except trio.Cancelled:
                    result = Failure(ClosedError("overlay call cancelled"))
                    loop.call_soon_threadsafe(deliver, result)
                    raise
                except Exception as exc:
                    result = Failure(exc)
                loop.call_soon_threadsafe(deliver, result)

        self._spawn(task)
        try:
            return await fut
        except asyncio.CancelledError:
            token = self._token
            if scope_box and token is not None:
                try:
                    token.run_sync_soon(scope_box[0].cancel)
                except trio.RunFinishedError:
                    pass
            raise

    def _spawn(self, task: Callable[[], Awaitable[None]]) -> None:
        token, nursery = self._token, self._nursery
        if self._closing or token is None or nursery is None:
            raise ClosedError("the overlay is shut down")

        def start() -> None:
            if self._nursery is not None:
                self._nursery.start_soon(task)

        try:
            token.run_sync_soon(start)
        except trio.RunFinishedError as exc:
            raise ClosedError("the overlay is shut down") from exc

    async def stream(self, agen_fn: Callable[..., AsyncIterator[T]], *args: Any, maxsize: int = 64) -> AsyncIterator[T]:
        """Iterate, from asyncio, an async generator that runs in the trio thread.

        Items travel through a bounded queue of ``maxsize`` entries; the trio producer waits when it
        is full. Leaving the ``async for`` early cancels the producer.

        Raises:
            whatever the generator raised, at the point of the stream where it raised.
        """
        loop = self._assert_asyncio_side()
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)

        async def produce() -> None:
            agen = agen_fn(*args)
            try:
                async for item in agen:
                    await self.call_asyncio(queue.put, item)
            except trio.Cancelled:
                raise
            except Exception as exc:
                await self.call_asyncio(queue.put, Failure(exc))
                return
            finally:
                aclose = getattr(agen, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(10):
                        await aclose()
            await self.call_asyncio(queue.put, _END)

        producer = asyncio.ensure_future(self.call(produce), loop=loop)
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, producer}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    producer.result()  # re-raises a bridge failure
                    raise ClosedError("overlay stream ended without its end marker")
                item = getter.result()
                if item is _END:
                    return
                if isinstance(item, Failure):
                    item.reraise()
                yield item
        finally:
            if not producer.done():
                producer.cancel()
            try:
                await producer
            except (asyncio.CancelledError, ClosedError):
                pass

    # ----------------------------------------------------------------- plain thread -> trio
    def run_blocking(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From a plain worker thread (neither the trio thread nor the asyncio loop's): run
        ``await fn(*args)`` in the trio thread and block until it returns (``trio.from_thread.run``).

        The tensor-parallel data plane uses this to drive a libp2p stream from its blocking
        compute thread; ``fn`` sets its own deadline.

        Raises:
            whatever ``fn`` raised; ``ClosedError`` when the bridge is shut down or the trio
            side cancelled the call.
        """
        assert not self.in_trio_thread(), "run_blocking from the trio thread would deadlock"
        token = self._token
        if self._closing or token is None:
            raise ClosedError("the overlay is shut down")
        try:
            return trio.from_thread.run(fn, *args, trio_token=token)
        except (trio.RunFinishedError, trio.Cancelled) as exc:
            raise ClosedError("the overlay stopped during a blocking call") from exc

    # ----------------------------------------------------------------- trio -> asyncio
    async def call_asyncio(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """From the trio thread: run ``await fn(*args)`` on the node's asyncio loop.

        Raises:
            whatever ``fn`` raised; ``ClosedError`` when the asyncio loop is gone. Cancelling the
            trio side cancels the asyncio task and waits for it to finish.
        """
        self.assert_trio_side()
        assert self._loop is not None
        token = trio.lowlevel.current_trio_token()
        try:
            cfut = asyncio.run_coroutine_threadsafe(fn(*args), self._loop)
        except RuntimeError as exc:
            raise ClosedError("the node's event loop is closed") from exc
        done = trio.Event()

        def on_done(_: concurrent.futures.Future[T]) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        cfut.add_done_callback(on_done)
        try:
            await done.wait()
        except trio.Cancelled:
            cfut.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await done.wait()
            raise
        try:
            return cfut.result()
        except concurrent.futures.CancelledError as exc:
            raise ClosedError("the asyncio side cancelled the call") from exc

    async def iterate_asyncio(self, aiter: AsyncIterator[T]) -> AsyncIterator[T]:
        """From the trio thread: iterate an asyncio async iterator, one item per crossing.

        The iterator is closed on the asyncio loop (``aclose``) when the trio side stops early.
        """
        self.assert_trio_side()
        finished = False

        async def next_item() -> Any:
            try:
                return await aiter.__anext__()
            except StopAsyncIteration:
                return _END

        try:
            while True:
                item = await self.call_asyncio(next_item)
                if item is _END:
                    finished = True
                    return
                yield item
        finally:
            aclose = getattr(aiter, "aclose", None)
            if not finished and aclose is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    try:
                        await self.call_asyncio(aclose)
                    except ClosedError:
                        pass
