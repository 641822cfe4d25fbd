"""In-memory routes for router tests (the Route protocol on scripted text, no model, no network)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from potluck.errors import TransferError
from potluck.identity import Tier
from potluck.routing.candidates import Candidate, Price
from potluck.routing.request import GenerationRequest
from potluck.routing.route import Finished, RouteEvent, TextDelta


class WordsRoute:
    """Answers with ``words`` one token each, continuing after ``request.continuation``; breaks
    with ``TransferError`` after ``die_after`` tokens when set. Records every request it gets."""

    def __init__(self, words: list[str], tier: Tier = Tier.COMMUNITY, die_after: int | None = None) -> None:
        self.words = words
        self.tier = tier
        self.die_after = die_after
        self.model_id = "m"
        self.received: list[GenerationRequest] = []

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        self.received.append(request)
        done = "".join(self.words)
        start = 0
        if request.continuation:  # continue the same answer after the text already produced
            assert done.startswith(request.continuation) or "<" in request.continuation
            start = sum(1 for _ in _prefix_tokens(self.words, request.continuation))
        n = 0
        for word in self.words[start : start + request.params.max_tokens]:
            if self.die_after is not None and n >= self.die_after:
                raise TransferError("stream broke: StreamEOF: ")
            n += 1
            yield TextDelta(word, 1)
        yield Finished("length", 3 + start, n)


def _prefix_tokens(words: list[str], text: str):
    acc = ""
    for w in words:
        if len(acc) >= len(text):
            return
        acc += w
        yield w


def candidate(
    key: str,
    route: WordsRoute,
    kind: str = "peer",
    tps: float | None = 20.0,
    queue: int = 0,
    rtt_s: float | None = 0.001,
    price: Price | None = None,
) -> Candidate:
    return Candidate(
        key=key,
        kind=kind,  # type: ignore[arg-type]
        target=key.split(":", 1)[-1],
        route=route,
        decode_tps=tps,
        queue=queue,
        rtt_s=rtt_s,
        price=price,
        peer=key.split(":", 1)[-1] if kind == "peer" else None,
    )


class StaticSource:
    """A provider with fixed candidates (``RouteProvider``)."""

    def __init__(self, candidates: list[Candidate]) -> None:
        self._candidates = candidates

    def listings(self):
        return []

    def route_for(self, model: str):
        return None

    def candidates(self, model: str) -> list[Candidate]:
        return list(self._candidates)
