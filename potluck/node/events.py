"""The node's event hub: one server-sent-events stream (``GET /api/events``) for the dashboard.

The hub holds *sections*: named, JSON-ready views of the node (``node``, ``cluster``, ``models``,
``tp``, ``audit``, ``throughput``...), each produced by a source function. :meth:`EventHub.run`
(a loop owned by the Node's :class:`~potluck.tasks.TaskOwner`) calls every source each
``interval_s`` and publishes a section only when its value changed, so a stream carries a full
snapshot once and deltas (per section) after that. Other parts of the node publish one-off events
with :meth:`EventHub.publish` (a model pull's progress, a tensor-parallel re-plan).

Each subscriber has a bounded queue. A subscriber that falls ``max_queue`` events behind is
dropped: its stream ends and the browser's ``EventSource`` reconnects, getting a fresh snapshot.
That keeps a stalled browser from holding memory on the node. :meth:`EventHub.close` ends every
stream (the node calls it when the HTTP server shuts down, so open streams do not hold shutdown).

Wire form (the SSE spec, https://html.spec.whatwg.org/multipage/server-sent-events.html)::

    id: 17
    event: cluster
    data: {"peer_id": "12D3KooW...", "peers": [...]}

"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_QUEUE = 256  # events a subscriber may lag behind before it is dropped
INTERVAL_S = 1.0  # seconds between polls of the sections' sources

Source = Callable[[], Any]


@dataclass(frozen=True)
class Event:
    """One server-sent event: ``kind`` is the SSE event name, ``data`` any JSON-ready value."""

    id: int
    kind: str
    data: Any

    def encode(self) -> bytes:
        """The event in SSE wire form (one ``data:`` line: the JSON has no newlines)."""
        payload = json.dumps(self.data, ensure_ascii=False, separators=(",", ":"), default=str)
        return f"id: {self.id}\nevent: {self.kind}\ndata: {payload}\n\n".encode()


_CLOSE = object()  # queued to end a subscription


class Subscription:
    """One stream's view of the hub; iterate it for events (it ends when dropped or closed)."""

    def __init__(self, max_queue: int) -> None:
        self._queue: asyncio.Queue[Event | object] = asyncio.Queue(max_queue + 1)  # +1: room for _CLOSE
        self._max = max_queue
        self.dropped = False

    def _offer(self, event: Event) -> bool:
        """Queue ``event``; False (and the stream ends) when the subscriber is too far behind."""
        if self._queue.qsize() >= self._max:
            self.dropped = True
            self._end()
            return False
        self._queue.put_nowait(event)
        return True

    def _end(self) -> None:
        while not self._queue.empty():  # the subscriber gets a fresh snapshot when it reconnects
            self._queue.get_nowait()
        self._queue.put_nowait(_CLOSE)

    async def get(self) -> Event | None:
        """The next event; ``None`` once the subscription ended (safe to cancel, e.g. by a timeout)."""
        item = await self._queue.get()
        if item is _CLOSE:
            self._queue.put_nowait(_CLOSE)  # stays ended for later calls
            return None
        assert isinstance(item, Event)
        return item

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self.get()) is not None:
            yield event


class EventHub:
    """Sections polled from sources, one-off events, and the bounded subscriber queues.

    Args:
        interval_s: seconds between polls of the sources (:meth:`run`).
        max_queue: events a subscriber may lag behind before it is dropped.
    """

    def __init__(self, interval_s: float = INTERVAL_S, max_queue: int = MAX_QUEUE) -> None:
        self.interval_s = interval_s
        self.max_queue = max_queue
        self._sources: dict[str, Source] = {}
        self._sections: dict[str, Event] = {}  # the latest event of each section
        self._encoded: dict[str, str] = {}  # its JSON, to tell whether a new value changed
        self._subscribers: set[Subscription] = set()
        self._next_id = 1
        self.closed = False

    def add_source(self, section: str, source: Source) -> None:
        """Poll ``source()`` for section ``section`` every ``interval_s`` (it must not block)."""
        self._sources[section] = source

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def snapshot(self) -> list[Event]:
        """The latest event of every section, in the order the sections first appeared."""
        return list(self._sections.values())

    def _event(self, kind: str, data: Any) -> Event:
        event = Event(self._next_id, kind, data)
        self._next_id += 1
        return event

    def _broadcast(self, event: Event) -> None:
        for sub in list(self._subscribers):
            if not sub._offer(event):
                self._subscribers.discard(sub)
                log.info("dropped an event-stream subscriber %d events behind", self.max_queue)

    def set_section(self, section: str, data: Any) -> bool:
        """Publish ``data`` as the new value of ``section`` if it differs; True if it was sent."""
        encoded = json.dumps(data, sort_keys=True, default=str)
        if self._encoded.get(section) == encoded:
            return False
        self._encoded[section] = encoded
        event = self._event(section, data)
        self._sections.pop(section, None)
        self._sections[section] = event
        self._broadcast(event)
        return True

    def publish(self, kind: str, data: Any) -> None:
        """Send a one-off event to every subscriber (not replayed to later ones)."""
        if not self.closed:
            self._broadcast(self._event(kind, data))

    def poll(self) -> None:
        """Call every source once and publish the sections that changed.

        A source that raises is logged and skipped for this round (the other sections still update);
        the error is re-raised only if it is not an ordinary ``Exception``.
        """
        for section, source in list(self._sources.items()):
            try:
                data = source()
            except Exception as exc:  # one broken view must not blank the whole dashboard
                log.warning("dashboard section %s failed: %s", section, exc, exc_info=exc)
                continue
            self.set_section(section, data)

    async def run(self, ready: asyncio.Future[None] | None = None) -> None:
        """Poll the sources every ``interval_s`` until cancelled (a TaskOwner task)."""
        self.poll()
        if ready is not None:
            ready.set_result(None)
        while True:
            await asyncio.sleep(self.interval_s)
            self.poll()

    def subscribe(self) -> Subscription:
        """A new subscription that starts with the current snapshot.

        Raises:
            RuntimeError: the hub is closed.
        """
        if self.closed:
            raise RuntimeError("the event hub is closed")
        sub = Subscription(self.max_queue)
        for event in self.snapshot()[: self.max_queue]:
            sub._offer(event)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def close(self) -> None:
        """End every stream; later subscriptions are refused."""
        self.closed = True
        for sub in list(self._subscribers):
            sub._end()
        self._subscribers.clear()


def now_ms() -> int:
    """Unix time in milliseconds (what the dashboard's clocks use)."""
    return int(time.time() * 1000)
