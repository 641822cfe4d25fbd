"""Concurrent requests through a real node decode together and each get their solo answer."""

from __future__ import annotations

import asyncio

from tests.inference.test_batched import smollm2_path

PROMPTS = ["The capital of France is", "Once upon a time", "def fib(n):", "1, 2, 3, 4,"]


async def test_concurrent_greedy_requests_equal_their_solo_answers(start_node):
    async with start_node(model=str(smollm2_path()), parallel=4, n_ctx=512, p2p_enabled=False) as (node, http):

        async def complete(prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": 16, "temperature": 0}
            async with http.post("/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                return (await resp.json())["choices"][0]["text"]

        solo = [await complete(p) for p in PROMPTS]
        route = node.router.local_routes[0]
        engine = route.runner.backend.engine
        together = await asyncio.gather(*(complete(p) for p in PROMPTS))
        assert together == solo
        assert engine.max_batch_seqs >= 2  # they shared llama_decode calls
        assert route.runner.slots == 4 and route.active == 0
        assert route.decode_tps > 0  # published as Hardware.decode_tps
