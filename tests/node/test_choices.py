"""``potluck.node.choices``: merging choice streams, fan-out seeds."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from potluck.errors import Overloaded
from potluck.node.choices import fan_out, merged
from potluck.node.openai_chat import Content
from potluck.routing.request import GenerationRequest, SamplingParams
from potluck.routing.route import Finished


async def _finite(text: str):
    yield Content(text)
    yield Finished("stop", 1, 1)


async def test_merged_tags_pieces_and_ends_after_every_finish():
    async with aclosing(merged([_finite("a"), _finite("b")])) as it:
        got = [(i, p) async for i, p in it]
    assert sorted((i, p.text) for i, p in got if isinstance(p, Content)) == [(0, "a"), (1, "b")]
    assert sum(isinstance(p, Finished) for _, p in got) == 2


async def test_leaving_early_closes_every_stream():
    closed = asyncio.Event()

    async def endless():
        try:
            while True:
                yield Content("x")
                await asyncio.sleep(0)
        finally:
            closed.set()

    async with aclosing(merged([endless(), _finite("b")])) as it:
        await anext(it)
    assert closed.is_set()


async def test_an_error_in_one_choice_is_raised():
    async def failing():
        raise Overloaded("queue full")
        yield  # pragma: no cover

    with pytest.raises(Overloaded):
        async with aclosing(merged([_finite("a"), failing()])) as it:
            async for _ in it:
                pass


def test_fan_out_seeds_and_order():
    gens = [
        GenerationRequest("m", SamplingParams(seed=10), prompt="p0"),
        GenerationRequest("m", SamplingParams(), prompt="p1"),
    ]
    choices = fan_out(gens, 2, ["p0", "p1"])
    assert [(c.gen.prompt, c.gen.params.seed, c.prompt_index, c.echo) for c in choices] == [
        ("p0", 10, 0, "p0"),
        ("p0", 11, 0, "p0"),
        ("p1", None, 1, "p1"),
        ("p1", None, 1, "p1"),
    ]
