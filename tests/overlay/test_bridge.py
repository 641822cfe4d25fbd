"""The asyncio <-> trio bridge: results, errors, cancellation both ways, streams, clean shutdown."""

from __future__ import annotations

import asyncio
import threading

import anyio
import anyio.lowlevel
import pytest

from potluck.errors import ClosedError, TransferError
from potluck.overlay.bridge import TrioThread
from tests.helpers import until_async


def _overlay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("test-bridge")]


async def test_call_returns_results_and_raises_errors():
    async with TrioThread("test-bridge") as bridge:

        async def add(a: int, b: int) -> int:
            bridge.assert_trio_side()
            await anyio.lowlevel.checkpoint()
            return a + b

        async def boom() -> None:
            raise TransferError("broke")

        assert await bridge.call(add, 2, 3) == 5
        with pytest.raises(TransferError, match="broke"):
            await bridge.call(boom)
    assert _overlay_threads() == []


async def test_cancelling_the_asyncio_side_cancels_the_trio_task():
    started, cancelled = threading.Event(), threading.Event()
    async with TrioThread("test-bridge") as bridge:

        async def forever() -> None:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

        task = asyncio.ensure_future(bridge.call(forever))
        await until_async(started.is_set, 10, "the trio task to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(cancelled.wait, 10)


async def test_trio_calls_into_asyncio_and_iterates_asyncio_generators():
    loop_thread = threading.current_thread()
    async with TrioThread("test-bridge") as bridge:

        async def on_asyncio(x: int) -> str:
            assert threading.current_thread() is loop_thread
            return f"x={x}"

        async def agen():
            for i in range(5):
                yield i

        async def trio_side() -> tuple[str, list[int]]:
            got = [i async for i in bridge.iterate_asyncio(agen())]
            return await bridge.call_asyncio(on_asyncio, 7), got

        assert await bridge.call(trio_side) == ("x=7", [0, 1, 2, 3, 4])


async def test_stream_delivers_items_errors_and_stops_the_producer_early():
    stopped = threading.Event()
    async with TrioThread("test-bridge") as bridge:

        async def numbers(n: int):
            try:
                for i in range(n):
                    await anyio.lowlevel.checkpoint()
                    yield i
            finally:
                stopped.set()

        async def failing():
            yield 1
            raise TransferError("mid-stream")

        assert [x async for x in bridge.stream(numbers, 100, maxsize=4)] == list(range(100))
        stopped.clear()
        got = []
        with pytest.raises(TransferError, match="mid-stream"):
            async for x in bridge.stream(failing):
                got.append(x)
        assert got == [1]
        it = bridge.stream(numbers, 10**9, maxsize=2)
        assert await it.__anext__() == 0
        await it.aclose()
        assert await asyncio.to_thread(stopped.wait, 10)


async def test_wrong_thread_calls_are_refused_and_closed_bridge_refuses_calls():
    bridge = TrioThread("test-bridge")
    async with bridge:
        with pytest.raises(AssertionError):
            await bridge.call_asyncio(asyncio.sleep, 0)  # asyncio side calling the trio-side API

    async def nothing() -> None:
        return None

    with pytest.raises(ClosedError):
        await bridge.call(nothing)
    assert _overlay_threads() == []


async def test_main_failure_before_ready_propagates():
    async def main(ready) -> None:
        raise RuntimeError("cannot start")

    with pytest.raises(RuntimeError, match="cannot start"):
        async with TrioThread("test-bridge", main):
            pass
    assert _overlay_threads() == []


async def test_stop_abandons_a_trio_thread_that_will_not_finish(monkeypatch, caplog):
    """A main that shields itself from cancellation (as a hung libp2p close does) cannot hang the
    node's shutdown: stopping gives up after STOP_TIMEOUT_S and says so."""
    import trio

    from potluck.overlay import bridge as bridge_module

    monkeypatch.setattr(bridge_module, "STOP_TIMEOUT_S", 0.5)
    release = threading.Event()

    async def main(ready) -> None:
        ready()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(release.wait)

    async with TrioThread("test-bridge-stuck", main):
        pass
    assert "did not stop within" in caplog.text
    release.set()  # let the abandoned thread end so it does not outlive the test
    await until_async(lambda: not _overlay_threads(), 10, what="the abandoned thread to end")
