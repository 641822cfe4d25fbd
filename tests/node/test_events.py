"""The dashboard's event hub: sections as snapshot + deltas, one-off events, bounded subscribers,
closing; and the HTTP side (``/api/events``, the page, pulls, the sent-text ring) on a bare app."""

from __future__ import annotations

import asyncio
import json

import pytest

from potluck.node.dashboard.outbound import SentLog, SentRequest
from potluck.node.events import Event, EventHub
from potluck.tasks import TaskOwner


def drain(sub) -> list[Event]:
    out = []
    while not sub._queue.empty():
        item = sub._queue.get_nowait()
        if isinstance(item, Event):
            out.append(item)
    return out


def test_sections_publish_only_changes_and_new_subscribers_get_the_snapshot():
    hub = EventHub()
    value = {"n": 1}
    hub.add_source("a", lambda: dict(value))
    hub.add_source("b", lambda: [1, 2])
    first = hub.subscribe()
    hub.poll()
    assert [(e.kind, e.data) for e in drain(first)] == [("a", {"n": 1}), ("b", [1, 2])]
    hub.poll()
    assert drain(first) == []  # nothing changed: no deltas
    value["n"] = 2
    hub.poll()
    assert [(e.kind, e.data) for e in drain(first)] == [("a", {"n": 2})]
    late = hub.subscribe()
    assert sorted((e.kind, json.dumps(e.data)) for e in drain(late)) == [("a", '{"n": 2}'), ("b", "[1, 2]")]


def test_one_off_events_reach_current_subscribers_only():
    hub = EventHub()
    sub = hub.subscribe()
    hub.publish("activity", {"text": "peer left"})
    assert [e.kind for e in drain(sub)] == ["activity"]
    assert drain(hub.subscribe()) == []


def test_event_ids_increase_and_encode_as_sse():
    hub = EventHub()
    sub = hub.subscribe()
    hub.publish("x", {"s": "é\nline"})
    hub.publish("x", 2)
    a, b = drain(sub)
    assert b.id == a.id + 1
    wire = a.encode().decode()
    assert wire.startswith(f"id: {a.id}\nevent: x\ndata: ") and wire.endswith("\n\n")
    assert wire.count("\n") == 4  # the JSON stays on one data line
    assert json.loads(wire.split("data: ", 1)[1]) == {"s": "é\nline"}


async def test_a_subscriber_that_falls_behind_is_dropped_and_its_stream_ends():
    hub = EventHub(max_queue=4)
    slow = hub.subscribe()
    fast = hub.subscribe()
    for i in range(4):
        hub.publish("tick", i)
        assert (await fast.get()).data == i
    hub.publish("tick", 4)  # the slow one holds 4 already: dropped
    assert slow.dropped and hub.subscribers == 1
    assert await asyncio.wait_for(slow.get(), 1) is None  # its backlog is discarded, the stream ends
    assert (await fast.get()).data == 4


async def test_close_ends_every_stream_and_refuses_new_ones():
    hub = EventHub()
    sub = hub.subscribe()
    got = []

    async def read():
        async for event in sub:
            got.append(event.kind)

    reader = asyncio.create_task(read())
    hub.publish("x", 1)
    await asyncio.sleep(0)
    hub.close()
    await asyncio.wait_for(reader, 1)
    assert got == ["x"]
    hub.publish("x", 2)  # ignored once closed
    with pytest.raises(RuntimeError):
        hub.subscribe()


async def test_get_is_cancellable_without_ending_the_subscription():
    hub = EventHub()
    sub = hub.subscribe()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sub.get(), 0.05)
    hub.publish("x", 1)
    assert (await asyncio.wait_for(sub.get(), 1)).data == 1


async def test_run_polls_until_cancelled_by_its_owner_and_a_broken_source_is_skipped():
    hub = EventHub(interval_s=0.01)
    calls = {"n": 0}

    def counter():
        calls["n"] += 1
        return calls["n"]

    def broken():
        raise ValueError("boom")

    hub.add_source("count", counter)
    hub.add_source("broken", broken)
    async with TaskOwner("t") as owner:
        task = await owner.start_ready(hub.run, "events", timeout=1)
        sub = hub.subscribe()
        seen = [(await sub.get()).data for _ in range(3)]
        assert seen == sorted(seen) and len(set(seen)) == 3
    assert task.cancelled() and owner.failure is None
    assert "broken" not in {e.kind for e in hub.snapshot()}


def test_sent_log_is_a_bounded_ring():
    log = SentLog(size=3)
    for i in range(5):
        log.add(SentRequest(f"r{i}", "m", "peer", True, (("user", f"<PERSON_{i}>"),), None))
    assert len(log) == 3 and log.get("r0") is None and log.get("r4") is not None
    assert log.get("r4").as_dict()["messages"] == [{"role": "user", "content": "<PERSON_4>"}]
