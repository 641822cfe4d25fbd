"""RPC over libp2p streams (``/potluck/rpc/1``): one request per stream, framed by :mod:`wire`.

Methods: ``ping`` (one ``Pong`` back; the caller measures the round trip), ``state_sync``
(anti-entropy: digest + records in, newer records out) and ``generate`` (a stream of
``TokenFrame`` ending with one ``FinishFrame``, or an ``ErrorFrame`` at any point) and
``tp_join`` (be a worker of a tensor-parallel group; the request and reply are opaque, size-bounded
payloads whose schema the tensor-parallel side owns: :mod:`potluck.overlay.tp_port`), ``challenge``
and ``possession`` (serving-quality checks: :mod:`potluck.overlay.verification`).

The server runs in the overlay's trio thread and hands the work to the node's asyncio loop
through the bridge (:class:`RpcApp`). Every request is refused unless the remote peer passed
admission; garbage, oversized and schema-invalid frames get an ``ErrorFrame("protocol")`` and are
counted, and the server keeps serving. Every client call has a deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol, TypeVar

import anyio
from libp2p.exceptions import BaseLibp2pError

from potluck.errors import (
    GenerationError,
    ModelLoading,
    ModelNotFound,
    Overloaded,
    PeerRefused,
    PotluckError,
    ProtocolViolation,
    RequestError,
    TransferError,
)
from potluck.identity import PeerId
from potluck.overlay.admission import Admission
from potluck.overlay.bridge import TrioThread
from potluck.overlay.host import Libp2pHost
from potluck.overlay.swarm_metrics import OverlayMetrics
from potluck.overlay.wire import (
    ChallengeAnswer,
    ChallengeRequest,
    ErrorFrame,
    FinishFrame,
    FrameStream,
    GenerateRequest,
    PingRequest,
    Pong,
    PossessionProof,
    PossessionRequest,
    StateSyncRequest,
    StateSyncResponse,
    TokenFrame,
    TpJoinFrame,
    TpJoinReplyFrame,
    WireModel,
)

log = logging.getLogger(__name__)

PROTOCOL = "/potluck/rpc/1"
REQUEST_TIMEOUT_S = 10.0  # to receive the request frame, and for ping / state_sync replies
FIRST_TOKEN_TIMEOUT_S = 120.0  # a queued generation may wait for the model
TOKEN_IDLE_TIMEOUT_S = 30.0  # between two frames of a running generation
CHALLENGE_TIMEOUT_S = 60.0  # a challenge waits for the peer's model like a queued generation
_MAX_BATCH_FRAMES = 64  # frames handed over together by generate()

_ERROR_CODES: list[tuple[type[PotluckError], str]] = [
    (ModelNotFound, "not_found"),
    (ModelLoading, "loading"),
    (Overloaded, "overloaded"),
    (RequestError, "bad_request"),
    (PeerRefused, "refused"),
    (ProtocolViolation, "protocol"),
]
_ERRORS_BY_CODE: dict[str, type[PotluckError]] = {code: cls for cls, code in _ERROR_CODES} | {"failed": GenerationError}


def error_frame(exc: PotluckError) -> ErrorFrame:
    code = next((c for cls, c in _ERROR_CODES if isinstance(exc, cls)), "failed")
    return ErrorFrame(code=code, message=str(exc)[:1024])  # type: ignore[arg-type]


def raise_error_frame(frame: ErrorFrame, peer: str) -> None:
    """Raise the potluck error an ``ErrorFrame`` stands for."""
    raise _ERRORS_BY_CODE[frame.code](f"peer {peer}: {frame.message}")


class RpcApp(Protocol):
    """What the RPC server asks of the node (asyncio side)."""

    async def state_sync(self, peer: PeerId, request: StateSyncRequest) -> StateSyncResponse: ...

    def generate(self, peer: PeerId, request: GenerateRequest) -> AsyncIterator[TokenFrame | FinishFrame]: ...

    async def tp_join(self, peer: PeerId, request: TpJoinFrame) -> TpJoinReplyFrame: ...

    async def challenge(self, peer: PeerId, request: ChallengeRequest) -> ChallengeAnswer: ...

    async def possession(self, peer: PeerId, request: PossessionRequest) -> PossessionProof: ...


class RpcServer:
    """Serves ``/potluck/rpc/1`` from the trio thread.

    Args:
        bridge: crossing to the node's asyncio loop, where ``app`` runs.
        app: the node-side implementation of the methods.
        admission: who may call.
        metrics: call and rejection counters.
    """

    def __init__(self, bridge: TrioThread, app: RpcApp, admission: Admission, metrics: OverlayMetrics) -> None:
        self.bridge = bridge
        self.app = app
        self.admission = admission
        self.metrics = metrics

    def install(self, host: Libp2pHost) -> None:
        host.set_handler(PROTOCOL, self.handle)

    async def handle(self, stream: object, peer: PeerId) -> None:
        """Serve one request on ``stream`` from the authenticated ``peer``. Never raises for bad input."""
        frames = FrameStream(stream)  # type: ignore[arg-type]
        if not self.admission.is_admitted(peer):
            self.admission.refuse(peer, "not_admitted", "rpc")
            self.metrics.rpc_calls.labels("any", "refused").inc()
            await _send_quietly(frames, ErrorFrame(code="refused", message="not admitted to this swarm"))
            return
        try:
            with anyio.fail_after(REQUEST_TIMEOUT_S):
                request = await frames.recv()
        except ProtocolViolation as exc:
            self.metrics.frames_rejected.inc()
            log.info("garbage RPC frame from %s: %s", peer, exc)
            await _send_quietly(frames, ErrorFrame(code="protocol", message=str(exc)[:1024]))
            return
        except (TransferError, TimeoutError) as exc:
            log.debug("RPC request from %s never arrived: %s", peer, exc)
            return
        method = getattr(request, "t", "?")
        try:
            await self._dispatch(frames, peer, request)
        except (TransferError, TimeoutError) as exc:
            self.metrics.rpc_calls.labels(method, "broken").inc()
            log.info("RPC %s for %s broke: %s", method, peer, exc)
            return
        except PotluckError as exc:
            self.metrics.rpc_calls.labels(method, "error").inc()
            log.info("RPC %s for %s failed: %s", method, peer, exc)
            await _send_quietly(frames, error_frame(exc))
            return
        self.metrics.rpc_calls.labels(method, "ok").inc()

    async def _dispatch(self, frames: FrameStream, peer: PeerId, request: WireModel) -> None:
        if isinstance(request, PingRequest):
            await frames.send(Pong(nonce=request.nonce))
        elif isinstance(request, StateSyncRequest):
            await frames.send(await self.bridge.call_asyncio(self.app.state_sync, peer, request))
        elif isinstance(request, GenerateRequest):
            events = self.bridge.iterate_asyncio(self.app.generate(peer, request))
            try:
                async for event in events:
                    await frames.send(event)
            finally:
                await events.aclose()  # type: ignore[attr-defined]
        elif isinstance(request, TpJoinFrame):
            await frames.send(await self.bridge.call_asyncio(self.app.tp_join, peer, request))
        elif isinstance(request, ChallengeRequest):
            await frames.send(await self.bridge.call_asyncio(self.app.challenge, peer, request))
        elif isinstance(request, PossessionRequest):
            await frames.send(await self.bridge.call_asyncio(self.app.possession, peer, request))
        else:
            self.metrics.frames_rejected.inc()
            raise ProtocolViolation(f"{type(request).__name__} is not an RPC request")


async def _send_quietly(frames: FrameStream, frame: WireModel) -> None:
    try:
        with anyio.fail_after(REQUEST_TIMEOUT_S):
            await frames.send(frame)
    except (TransferError, ProtocolViolation, TimeoutError):
        pass


# ---------------------------------------------------------------------- client (trio thread)
async def _open(host: Libp2pHost, peer: PeerId) -> FrameStream:
    return FrameStream(await host.open_stream(peer, PROTOCOL, deadline_s=REQUEST_TIMEOUT_S))


async def _reply(frames: FrameStream, peer: PeerId, deadline_s: float) -> WireModel:
    try:
        with anyio.fail_after(deadline_s):
            frame = await frames.recv()
    except TimeoutError as exc:
        raise TransferError(f"peer {peer} did not answer within {deadline_s} s") from exc
    if isinstance(frame, ErrorFrame):
        raise_error_frame(frame, peer)
    return frame


async def _closing(frames: FrameStream) -> None:
    try:
        await frames.stream.close()  # type: ignore[attr-defined]
    except (BaseLibp2pError, OSError) as exc:
        log.debug("closing an RPC stream: %s", exc)


_Reply = TypeVar("_Reply", bound=WireModel)


async def _unary(
    host: Libp2pHost, peer: PeerId, request: WireModel, expect: type[_Reply], method: str, deadline_s: float
) -> _Reply:
    """One request and one reply of type ``expect`` within ``deadline_s``, on a fresh RPC stream.

    Raises:
        ConnectError, TransferError (no answer in time), PeerRefused, ProtocolViolation (another
        frame type), or the error the peer's ``ErrorFrame`` names.
    """
    frames = await _open(host, peer)
    try:
        await frames.send(request)
        resp = await _reply(frames, peer, deadline_s)
        if not isinstance(resp, expect):
            raise ProtocolViolation(f"peer {peer} answered {method} with {type(resp).__name__}")
        return resp
    finally:
        await _closing(frames)


async def ping(host: Libp2pHost, peer: PeerId) -> float:
    """Round-trip time to ``peer`` over a fresh RPC stream, in seconds.

    Raises:
        ConnectError, TransferError, PeerRefused, ProtocolViolation.
    """
    frames = await _open(host, peer)
    try:
        nonce = time.monotonic_ns() & ((1 << 62) - 1)
        start = time.perf_counter()
        await frames.send(PingRequest(nonce=nonce))
        pong = await _reply(frames, peer, REQUEST_TIMEOUT_S)
        if not isinstance(pong, Pong) or pong.nonce != nonce:
            raise ProtocolViolation(f"peer {peer} answered ping with {type(pong).__name__}")
        return time.perf_counter() - start
    finally:
        await _closing(frames)


async def state_sync(host: Libp2pHost, peer: PeerId, request: StateSyncRequest) -> StateSyncResponse:
    """Anti-entropy round with ``peer``.

    Raises:
        ConnectError, TransferError, PeerRefused, ProtocolViolation.
    """
    return await _unary(host, peer, request, StateSyncResponse, "state_sync", REQUEST_TIMEOUT_S)


async def generate(
    host: Libp2pHost, peer: PeerId, request: GenerateRequest
) -> AsyncIterator[list[TokenFrame | FinishFrame]]:
    """Run a completion on ``peer``; yield its frames in batches: each batch is a frame plus every
    frame already received behind it (so the caller crosses the bridge once per batch, not per
    frame). The ``FinishFrame`` ends the last batch.

    Deadlines: ``FIRST_TOKEN_TIMEOUT_S`` for the first frame, ``TOKEN_IDLE_TIMEOUT_S`` between frames.

    Raises:
        ConnectError: no stream could be opened.
        TransferError: the stream broke or stalled mid-generation.
        ModelNotFound / Overloaded / RequestError / GenerationError / PeerRefused: the peer's answer.
        ProtocolViolation: the peer sent garbage.
    """
    frames = await _open(host, peer)
    try:
        await frames.send(request)
        timeout = FIRST_TOKEN_TIMEOUT_S
        while True:
            batch = [await _generation_frame(frames, peer, timeout)]
            timeout = TOKEN_IDLE_TIMEOUT_S
            failure: PotluckError | None = None
            while not isinstance(batch[-1], FinishFrame) and len(batch) < _MAX_BATCH_FRAMES and frames.has_frame():
                try:  # already buffered: no waiting, and a bad frame behind good ones fails after them
                    batch.append(await _generation_frame(frames, peer, timeout))
                except PotluckError as exc:
                    failure = exc
                    break
            yield batch
            if failure is not None:
                raise failure
            if isinstance(batch[-1], FinishFrame):
                return
    finally:
        await _closing(frames)


async def _generation_frame(frames: FrameStream, peer: PeerId, deadline_s: float) -> TokenFrame | FinishFrame:
    frame = await _reply(frames, peer, deadline_s)
    if not isinstance(frame, (TokenFrame, FinishFrame)):
        raise ProtocolViolation(f"peer {peer} sent {type(frame).__name__} inside a generation")
    return frame


async def tp_join(host: Libp2pHost, peer: PeerId, request: TpJoinFrame) -> TpJoinReplyFrame:
    """Ask ``peer`` to join a tensor-parallel group (it answers once it has accepted the work;
    loading its shard and connecting to the star happen after the reply). The payloads are opaque
    here: the caller validates the reply's (and checks that it names its session).

    Raises:
        ConnectError, TransferError, PeerRefused (the peer declined: setting, memory, busy),
        ProtocolViolation.
    """
    return await _unary(host, peer, request, TpJoinReplyFrame, "tp_join", REQUEST_TIMEOUT_S)


async def challenge(host: Libp2pHost, peer: PeerId, request: ChallengeRequest) -> ChallengeAnswer:
    """Send a verification challenge; the answer within ``CHALLENGE_TIMEOUT_S``.

    Raises:
        ConnectError, TransferError (no answer in time), ModelNotFound (the peer lacks the model),
        PeerRefused, ProtocolViolation (wrong frame or nonce).
    """
    resp = await _unary(host, peer, request, ChallengeAnswer, "a challenge", CHALLENGE_TIMEOUT_S)
    if resp.nonce != request.nonce:
        raise ProtocolViolation(f"peer {peer} answered a challenge with another nonce")
    return resp


async def possession(host: Libp2pHost, peer: PeerId, request: PossessionRequest) -> PossessionProof:
    """Ask for chunks of a model file with their Merkle proofs; the reply within ``REQUEST_TIMEOUT_S``.

    Raises:
        ConnectError, TransferError, ModelNotFound, PeerRefused, ProtocolViolation.
    """
    resp = await _unary(host, peer, request, PossessionProof, "a possession request", REQUEST_TIMEOUT_S)
    if resp.nonce != request.nonce:
        raise ProtocolViolation(f"peer {peer} answered a possession request with another nonce")
    return resp
