"""Tokens cross to peers in batches: the serving side coalesces route events into TokenFrames
(real llama.cpp on a fixture model), the receiving side hands over every frame already buffered
in one batch; the text, the token counts and the errors stay exactly what they were per token."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Iterator

import pytest

from potluck.errors import ProtocolViolation, RequestError
from potluck.identity import PeerId
from potluck.inference.llamacpp import LlamaCppBackend
from potluck.inference.route import LoadedModelRoute
from potluck.inference.runner import ModelRunner
from potluck.overlay import rpc
from potluck.overlay.bridge import TrioThread
from potluck.overlay.serving import LocalServing
from potluck.overlay.wire import FinishFrame, GenerateRequest, TokenFrame, WireSampling, encode
from potluck.routing.router import Router
from tests.conftest import MODELS
from tests.overlay.memory import MemoryStream

PEER = PeerId("12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo")
MODEL = "ts-q8"


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    backend = LlamaCppBackend(MODELS / "tinyshakespeare-q8_0.gguf", MODEL, n_ctx=256)
    backend.load()
    runner = ModelRunner(backend, max_queue=4)
    yield runner
    runner.close()


def serving(runner: ModelRunner, flush_interval_s: float) -> LocalServing:
    router = Router()
    router.add_local(LoadedModelRoute(runner))
    return LocalServing(router, flush_interval_s=flush_interval_s)


def request(max_tokens: int, prompt: str = "ROMEO:\n") -> GenerateRequest:
    return GenerateRequest(
        model=MODEL, params=WireSampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=0), prompt=prompt
    )


async def frames_of(local: LocalServing, req: GenerateRequest) -> list[TokenFrame | FinishFrame]:
    return [frame async for frame in local.serve(req)]


async def test_tokens_are_coalesced_into_few_frames_with_the_same_text(runner: ModelRunner) -> None:
    per_event = await frames_of(serving(runner, 0.0), request(48))
    batched = await frames_of(serving(runner, 60.0), request(48))
    for frames in (per_event, batched):
        assert isinstance(frames[-1], FinishFrame) and frames[-1].completion_tokens == 48
        tokens = [f for f in frames[:-1] if isinstance(f, TokenFrame)]
        assert len(tokens) == len(frames) - 1
        assert sum(f.n_tokens for f in tokens) == 48
    text = lambda frames: "".join(f.text for f in frames if isinstance(f, TokenFrame))  # noqa: E731
    assert text(batched) == text(per_event) != ""
    # The first token goes out at once; the rest shares one frame (sent when the model finished,
    # well before the 60 s interval), then the finish frame.
    assert len(batched) <= 3


async def test_leaving_early_stops_the_model(runner: ModelRunner) -> None:
    local = serving(runner, 0.0)
    stream = local.serve(request(200))
    first = await stream.__anext__()
    assert isinstance(first, TokenFrame)
    await stream.aclose()  # type: ignore[attr-defined]
    assert runner.active == 0  # the pump was cancelled and awaited: the model is free again
    frames = await frames_of(local, request(4))  # and serves the next request
    assert isinstance(frames[-1], FinishFrame) and frames[-1].completion_tokens == 4


async def test_route_errors_still_reach_the_peer(runner: ModelRunner) -> None:
    with pytest.raises(RequestError, match="context"):
        await frames_of(serving(runner, 0.005), request(8, prompt="ROMEO: " * 400))


# -- the receiving side -------------------------------------------------------------------------


class MemoryHost:
    """Opens one in-memory stream (the RPC client needs nothing else of a host)."""

    def __init__(self, stream: MemoryStream) -> None:
        self.stream = stream

    async def open_stream(self, peer: PeerId, protocol: str, deadline_s: float) -> MemoryStream:
        return self.stream


TOKENS = [TokenFrame(text=f"t{i} ", n_tokens=1) for i in range(5)]
FINISH = FinishFrame(finish_reason="length", prompt_tokens=3, completion_tokens=5)


async def batches(data: bytes, chunk: int) -> tuple[list[list[TokenFrame | FinishFrame]], Exception | None]:
    out: list[list[TokenFrame | FinishFrame]] = []

    async def collect() -> Exception | None:
        host = MemoryHost(MemoryStream(data, chunk))
        agen: AsyncIterator[list[TokenFrame | FinishFrame]] = rpc.generate(host, PEER, request(5))  # type: ignore[arg-type]
        try:
            async for batch in agen:
                out.append(batch)
        except ProtocolViolation as exc:
            return exc
        return None

    async with TrioThread("test-batches") as bridge:
        error = await bridge.call(collect)
    return out, error


async def test_frames_already_received_cross_as_one_batch() -> None:
    data = b"".join(encode(f) for f in [*TOKENS, FINISH])
    together, error = await batches(data, chunk=1 << 16)  # everything arrives in one read
    assert error is None and together == [[*TOKENS, FINISH]]
    trickled, error = await batches(data, chunk=5)  # frames arrive in pieces: smaller batches
    assert error is None and len(trickled) > 1
    assert [f for batch in trickled for f in batch] == [*TOKENS, FINISH]


async def test_a_bad_frame_behind_good_ones_fails_after_them() -> None:
    garbage = struct.pack(">I", 3) + b"\xc1\xc1\xc1"
    data = b"".join(encode(f) for f in TOKENS[:2]) + garbage
    got, error = await batches(data, chunk=1 << 16)
    assert got == [TOKENS[:2]]  # the tokens before the garbage still reach the route
    assert isinstance(error, ProtocolViolation)
