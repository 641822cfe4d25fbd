"""Run a blocking :class:`~potluck.inference.backend.Backend` from asyncio.

Up to ``backend_concurrency(backend)`` generations at once per model (1 for single-sequence
backends such as tensor parallelism; the batch slots of
:class:`~potluck.inference.batched_backend.BatchedLlamaCppBackend`): a request waits its turn
behind a bounded queue (:class:`~potluck.errors.Overloaded` past ``max_queue`` waiters). Each
generation loop runs in a worker thread and hands tokens to the event loop through an asyncio queue with
``call_soon_threadsafe``; the consumer drains whatever has arrived in one go, so a fast model
costs one event-loop wake-up per batch, not per token. Leaving the ``async for`` early (client
disconnect, task cancelled) sets the cancel event, and the runner waits for the worker to stop
before its slot goes to the next request. Tokenizing and chat rendering run on a thread of
their own, so a request is counted in the queue while generations hold every slot.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, TypeVar

from potluck.errors import GenerationError, Overloaded, PotluckError
from potluck.inference.backend import Backend, GeneratedToken, backend_concurrency
from potluck.routing.request import SamplingParams
from potluck.tasks import Failure

_DONE = object()
T = TypeVar("T")


class ModelRunner:
    """Runs at most ``backend_concurrency(backend)`` generations at once and streams their tokens.

    Args:
        backend: a loaded backend.
        max_queue: requests allowed to wait while every slot generates; more raise ``Overloaded``.
    """

    def __init__(self, backend: Backend, max_queue: int) -> None:
        self.backend = backend
        self.slots = backend_concurrency(backend)
        self._max_queue = max_queue
        self._free_slots = asyncio.Semaphore(self.slots)
        self._waiting = 0
        self._active = 0
        self._executor = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="potluck-gen")
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="potluck-prep")

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot (not counting those generating)."""
        return self._waiting

    @property
    def active(self) -> int:
        """Generations in progress (0 to ``slots``)."""
        return self._active

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking backend call (tokenize, render) on the preparation thread (never
        behind a running generation)."""
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    async def stream(
        self, prompt: str | Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[list[GeneratedToken], None]:
        """Generate after ``prompt``; yield batches of tokens as they arrive.

        Raises:
            Overloaded: ``max_queue`` requests are already waiting.
            GenerationError: the backend failed.
        """
        if self._free_slots.locked() and self._waiting >= self._max_queue:
            raise Overloaded(f"{self._waiting} requests already queued for this model", retry_after=1.0)
        self._waiting += 1
        try:
            await self._free_slots.acquire()
        finally:
            self._waiting -= 1
        self._active += 1
        try:
            async for batch in self._stream_locked(prompt, params):
                yield batch
        finally:
            self._active -= 1
            self._free_slots.release()

    async def _stream_locked(
        self, prompt: str | Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[list[GeneratedToken], None]:
        loop = asyncio.get_running_loop()
        # Bounded by construction: the worker puts at most max_tokens + 1 items.
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                for token in self.backend.generate(prompt, params, cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, token)
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                loop.call_soon_threadsafe(queue.put_nowait, Failure(exc))

        worker = loop.run_in_executor(self._executor, work)
        try:
            while True:
                batch: list[GeneratedToken] = []
                item = await queue.get()
                while True:
                    if item is _DONE:
                        if batch:
                            yield batch
                        return
                    if isinstance(item, Failure):
                        if batch:  # the tokens produced before the failure still reach the client
                            yield batch
                        if isinstance(item.exc, PotluckError):
                            item.reraise()
                        raise GenerationError(f"backend failed: {item.exc}") from item.exc
                    batch.append(item)  # type: ignore[arg-type]
                    try:
                        item = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                yield batch
        finally:
            cancel.set()
            # The worker checks ``cancel`` after every token; wait so the next request never
            # overlaps this one in its slot, even if we are being cancelled.
            with suppress(Exception):
                await asyncio.shield(worker)

    def close(self) -> None:
        """Stop the worker threads (after any running generation) and free the model."""
        self._prep.shutdown(wait=True)
        self._executor.shutdown(wait=True)
        self.backend.close()
