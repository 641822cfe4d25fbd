"""ModelRunner with a multi-slot backend: up to ``max_concurrency`` generations at once, then the
bounded queue, then ``Overloaded`` (HTTP 429); and the thread rule of inference/threads.py."""

from __future__ import annotations

import asyncio

import pytest

from potluck.errors import Overloaded
from potluck.inference.runner import ModelRunner
from potluck.inference.scripted import ScriptedBackend
from potluck.inference.threads import choose_threads
from potluck.routing.request import SamplingParams
from tests.helpers import until_async

PARAMS = SamplingParams(max_tokens=5, temperature=0.0)


async def collect(runner: ModelRunner) -> str:
    return "".join(t.text for batch in [b async for b in runner.stream("x", PARAMS)] for t in batch)


async def test_slots_run_together_then_queue_then_refuse():
    backend = ScriptedBackend()
    backend.max_concurrency = 2  # type: ignore[attr-defined]  # what a batched backend declares
    backend.hold(after=0)
    runner = ModelRunner(backend, max_queue=1)
    tasks = [asyncio.create_task(collect(runner)) for _ in range(2)]
    try:
        await until_async(lambda: runner.active == 2 and len(backend.generations) == 2, 10, "two generations")
        queued = asyncio.create_task(collect(runner))
        tasks.append(queued)
        await until_async(lambda: runner.queue_depth == 1, 10, "the third request to queue")
        with pytest.raises(Overloaded):
            await collect(runner)
        backend.release()
        assert await asyncio.gather(*tasks) == ["The q"] * 3
        assert runner.active == 0 and runner.queue_depth == 0
    finally:
        backend.release()
        await asyncio.gather(*tasks, return_exceptions=True)
        runner.close()


async def test_single_sequence_backend_is_serialized():
    backend = ScriptedBackend()  # declares no max_concurrency: one generation at a time
    backend.hold(after=0)
    runner = ModelRunner(backend, max_queue=4)
    tasks = [asyncio.create_task(collect(runner)) for _ in range(2)]
    try:
        await until_async(lambda: runner.active == 1 and runner.queue_depth == 1, 10, "one running, one queued")
        assert len(backend.generations) == 1
        backend.release()
        assert await asyncio.gather(*tasks) == ["The q"] * 2
    finally:
        backend.release()
        await asyncio.gather(*tasks, return_exceptions=True)
        runner.close()


@pytest.mark.parametrize(
    ("cores", "system", "own", "max_threads", "expected"),
    [
        (2, 0.0, 0.0, 2, 2),  # idle machine: every core
        (2, 1.0, 0.0, 2, 1),  # another process holds a core: leave it alone
        (2, 2.0, 1.1, 2, 1),  # we use ~1.1 cores and the other ~0.9: still one taken
        (2, 1.3, 1.0, 2, 2),  # background noise below the threshold does not count
        (2, 2.0, 0.0, 2, 1),  # both cores busy: never fewer than one thread
        (8, 3.0, 0.0, 4, 4),  # capped by max_threads
    ],
)
def test_choose_threads(cores, system, own, max_threads, expected):
    assert choose_threads(cores, system, own, max_threads) == expected


def test_a_core_is_kept_for_the_nodes_own_threads():
    assert choose_threads(2, 0.0, 0.0, 2, reserve=1) == 1
    assert choose_threads(8, 0.0, 0.0, 8, reserve=1) == 7
    assert choose_threads(8, 2.0, 0.0, 8, reserve=1) == 5
    assert choose_threads(1, 0.0, 0.0, 1, reserve=1) == 1  # never fewer than one
