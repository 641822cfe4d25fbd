"""Wire format of potluck's libp2p protocols: length-prefixed msgpack frames of strict models.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of msgpack (the
msgpack spec, https://github.com/msgpack/msgpack/blob/master/spec.md). The length is checked
against a maximum *before* anything is read or allocated; the payload is decoded with msgpack's
own size limits, must be a map with a ``"t"`` (type) key, and is validated into one of the frozen
pydantic models below, which refuse unknown fields (``extra="forbid"``) and out-of-range values.
Nothing on the wire is ever unpickled or evaluated.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Literal, Protocol

import msgpack
from libp2p.exceptions import BaseLibp2pError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from potluck.errors import ProtocolViolation, TransferError

MAX_FRAME = 1 << 20  # bytes; the largest frame any potluck protocol accepts
_LEN = struct.Struct(">I")
_MAX_TEXT = 256 << 10  # characters of one prompt/message
_MAX_RECORDS = 4096  # records in one state-sync frame


class WireModel(BaseModel):
    """Base of every frame: frozen, strict, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


# ------------------------------------------------------------------ admission (/potluck/admit/1)
class AdmitChallenge(WireModel):
    t: Literal["admit_challenge"] = "admit_challenge"
    swarm: str = Field(max_length=128)
    nonce: bytes = Field(min_length=32, max_length=32)


class AdmitProof(WireModel):
    t: Literal["admit_proof"] = "admit_proof"
    swarm: str = Field(max_length=128)
    mac: bytes = Field(min_length=32, max_length=32)


class AdmitResult(WireModel):
    t: Literal["admit_result"] = "admit_result"
    ok: bool
    reason: str = Field("", max_length=256)


# ------------------------------------------------------------------ RPC (/potluck/rpc/1)
class PingRequest(WireModel):
    t: Literal["ping"] = "ping"
    nonce: int = Field(ge=0, lt=1 << 63)


class Pong(WireModel):
    t: Literal["pong"] = "pong"
    nonce: int = Field(ge=0, lt=1 << 63)


class WireToolCall(WireModel):
    """A tool call an assistant message made (``potluck.routing.request.ToolCall``)."""

    id: str = Field(max_length=256)
    name: str = Field(max_length=256)
    arguments: str = Field(max_length=_MAX_TEXT)


class WireMessage(WireModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=_MAX_TEXT)
    tool_calls: tuple[WireToolCall, ...] = Field((), max_length=64)
    tool_call_id: str | None = Field(None, max_length=256)
    name: str | None = Field(None, max_length=256)


class WireSampling(WireModel):
    max_tokens: int = Field(ge=1, le=1 << 20)
    temperature: float = Field(ge=0.0, le=100.0)
    top_p: float = Field(gt=0.0, le=1.0)
    top_k: int = Field(ge=0, le=1 << 20)
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stop: tuple[Annotated[str, Field(max_length=256)], ...] = Field((), max_length=16)
    grammar: str | None = Field(None, max_length=_MAX_TEXT)  # GBNF; the serving backend compiles and checks it
    logprobs: int | None = Field(None, ge=0, le=20)


class GenerateRequest(WireModel):
    """Run a completion on the peer. Exactly one of ``prompt`` / ``messages`` is set.

    ``continuation`` is text already produced by another peer for this request (a resumed
    stream): the peer continues after it instead of starting the answer anew.
    """

    t: Literal["generate"] = "generate"
    model: str = Field(min_length=1, max_length=256)
    params: WireSampling
    prompt: str | None = Field(None, max_length=_MAX_TEXT)
    messages: tuple[WireMessage, ...] | None = Field(None, max_length=1024)
    continuation: str = Field("", max_length=_MAX_TEXT)
    headers: tuple[tuple[str, str], ...] = Field((), max_length=64)
    tools: str | None = Field(None, max_length=_MAX_TEXT)  # JSON text of OpenAI tool definitions


class WireTopLogprob(WireModel):
    token: str = Field(max_length=1024)
    logprob: float = Field(le=0.0)
    token_bytes: bytes = Field(b"", max_length=1024)


class WireLogprob(WireTopLogprob):
    """One generated token's log-probability and its top alternatives (``TokenLogprob``)."""

    top: tuple[WireTopLogprob, ...] = Field((), max_length=20)


class TokenFrame(WireModel):
    t: Literal["tokens"] = "tokens"
    text: str = Field(max_length=_MAX_TEXT)
    n_tokens: int = Field(ge=0, le=1 << 20)
    logprobs: tuple[WireLogprob, ...] = Field((), max_length=1024)


class FinishFrame(WireModel):
    t: Literal["finish"] = "finish"
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


class ErrorFrame(WireModel):
    """The peer could not serve the request. ``code`` names the potluck error class."""

    t: Literal["error"] = "error"
    code: Literal["refused", "protocol", "not_found", "overloaded", "bad_request", "failed", "loading"]
    message: str = Field(max_length=1024)


class StateSyncRequest(WireModel):
    """Anti-entropy: the records the asker holds (``peer_id -> seq``) plus its own signed record."""

    t: Literal["state_sync"] = "state_sync"
    have: dict[Annotated[str, Field(max_length=128)], Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, max_length=_MAX_RECORDS
    )
    records: tuple[bytes, ...] = Field((), max_length=_MAX_RECORDS)


class StateSyncResponse(WireModel):
    t: Literal["state_sync_resp"] = "state_sync_resp"
    records: tuple[bytes, ...] = Field((), max_length=_MAX_RECORDS)


# ------------------------------------------------------------------ tensor parallelism
_HEX = r"^[0-9a-f]+$"
#: Largest tensor-parallel payload carried in an RPC frame, bytes.
MAX_TP_PAYLOAD = 128 << 10
#: Largest tensor-parallel reply payload, bytes.
MAX_TP_REPLY_PAYLOAD = 4 << 10


class TpJoinFrame(WireModel):
    """RPC ``tp_join``: the master asks this node to be one rank of a tensor-parallel group.

    The overlay only carries ``payload``: msgpack of the tensor-parallel side's own strict join
    request (``potluck.sharding.orchestration.messages.TpJoinRequest``), validated there. The
    overlay bounds its size, admits the caller and encrypts it (the star session key is inside).
    """

    t: Literal["tp_join"] = "tp_join"
    payload: bytes = Field(min_length=1, max_length=MAX_TP_PAYLOAD)


class TpJoinReplyFrame(WireModel):
    """The worker accepted; ``payload`` is its reply, opaque to the overlay like the request."""

    t: Literal["tp_join_ok"] = "tp_join_ok"
    payload: bytes = Field(min_length=1, max_length=MAX_TP_REPLY_PAYLOAD)


class TpStreamHello(WireModel):
    """First frame on a ``/potluck/tp-star/1`` stream (worker -> master): which group and rank."""

    t: Literal["tp_stream"] = "tp_stream"
    session: str = Field(min_length=32, max_length=32, pattern=_HEX)
    rank: int = Field(ge=1, le=255)


class TpStreamAck(WireModel):
    """Master -> worker: the stream now carries the star's binary frames."""

    t: Literal["tp_stream_ok"] = "tp_stream_ok"
    session: str = Field(min_length=32, max_length=32, pattern=_HEX)


# ------------------------------------------------------------------ verification (issue 14)
_SHA256_HEX = r"^[0-9a-f]{64}$"
MAX_CHALLENGE_TOKENS = 64
MAX_POSSESSION_CHUNKS = 3  # chunks of 256 KiB per proof frame: three fit one 1 MiB frame


class ChallengeRequest(WireModel):
    """RPC ``challenge``: the greedy ``n_tokens`` after ``prompt`` on the model whose GGUF has
    SHA-256 ``model_sha256`` (:mod:`potluck.overlay.verification.challenge`)."""

    t: Literal["challenge"] = "challenge"
    model_sha256: str = Field(pattern=_SHA256_HEX)
    nonce: bytes = Field(min_length=16, max_length=16)
    prompt: str = Field(min_length=1, max_length=1024)
    n_tokens: int = Field(ge=1, le=MAX_CHALLENGE_TOKENS)


class ChallengeAnswer(WireModel):
    """The answer: each token's bytes, natural-log probability and best-vs-runner-up gap."""

    t: Literal["challenge_answer"] = "challenge_answer"
    nonce: bytes = Field(min_length=16, max_length=16)
    tokens: tuple[Annotated[bytes, Field(max_length=128)], ...] = Field(max_length=MAX_CHALLENGE_TOKENS)
    logprobs: tuple[Annotated[float, Field(ge=-1e4, le=0.0)], ...] = Field(max_length=MAX_CHALLENGE_TOKENS)
    gaps: tuple[Annotated[float, Field(ge=0.0, le=1e4)], ...] = Field(max_length=MAX_CHALLENGE_TOKENS)


class PossessionRequest(WireModel):
    """RPC ``possession``: chunks ``indices`` of the GGUF ``model_sha256``, with Merkle proofs."""

    t: Literal["possession"] = "possession"
    model_sha256: str = Field(pattern=_SHA256_HEX)
    nonce: bytes = Field(min_length=16, max_length=16)
    indices: tuple[Annotated[int, Field(ge=0, lt=1 << 40)], ...] = Field(min_length=1, max_length=MAX_POSSESSION_CHUNKS)


_AuditPath = Annotated[tuple[Annotated[bytes, Field(min_length=32, max_length=32)], ...], Field(max_length=64)]


class PossessionProof(WireModel):
    """The chunks (256 KiB each, the last one shorter) and each one's audit path (RFC 6962)."""

    t: Literal["possession_proof"] = "possession_proof"
    nonce: bytes = Field(min_length=16, max_length=16)
    chunks: tuple[Annotated[bytes, Field(max_length=256 << 10)], ...] = Field(max_length=MAX_POSSESSION_CHUNKS)
    paths: tuple[_AuditPath, ...] = Field(max_length=MAX_POSSESSION_CHUNKS)


Frame = Annotated[
    AdmitChallenge
    | AdmitProof
    | AdmitResult
    | PingRequest
    | Pong
    | GenerateRequest
    | TokenFrame
    | FinishFrame
    | ErrorFrame
    | StateSyncRequest
    | StateSyncResponse
    | TpJoinFrame
    | TpJoinReplyFrame
    | TpStreamHello
    | TpStreamAck
    | ChallengeRequest
    | ChallengeAnswer
    | PossessionRequest
    | PossessionProof,
    Field(discriminator="t"),
]
_FRAME = TypeAdapter(Frame)


def encode(frame: WireModel, max_frame: int = MAX_FRAME) -> bytes:
    """Length prefix + msgpack payload of ``frame``.

    Raises:
        ProtocolViolation: the encoded frame exceeds ``max_frame`` bytes.
    """
    payload = msgpack.packb(frame.model_dump(mode="python"), use_bin_type=True)
    if len(payload) > max_frame:
        raise ProtocolViolation(
            f"{type(frame).__name__} frame of {len(payload)} bytes exceeds the {max_frame}-byte limit"
        )
    return _LEN.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> WireModel:
    """Validate one frame payload (no length prefix).

    Raises:
        ProtocolViolation: not msgpack, not a map with a known ``t``, or fails the schema.
    """
    try:
        obj: Any = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolViolation(f"undecodable frame: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolViolation(f"frame is a {type(obj).__name__}, not a map")
    try:
        return _FRAME.validate_python(_lists_to_tuples(obj))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])  # the frame type tag, then the field path
        raise ProtocolViolation(f"invalid frame: {exc.error_count()} schema errors: {where}: {first['msg']}") from exc


def _lists_to_tuples(obj: Any) -> Any:
    # msgpack gives tuples for arrays (use_list=False); keep dicts' values converted too.
    if isinstance(obj, dict):
        return {k: _lists_to_tuples(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_lists_to_tuples(v) for v in obj)
    return obj


class ByteStream(Protocol):
    """What a frame reader needs of a stream (a libp2p ``INetStream`` fits)."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


class FrameStream:
    """Reads and writes frames on a byte stream, with an internal read buffer.

    Args:
        stream: the underlying stream (libp2p stream or in-memory test double).
        max_frame: largest accepted payload, in bytes.
    """

    def __init__(self, stream: ByteStream, max_frame: int = MAX_FRAME) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._buf = bytearray()

    async def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = await self.stream.read(max(n - len(self._buf), 4096))
            except (OSError, EOFError, BaseLibp2pError) as exc:  # StreamEOF, StreamReset, ...
                raise TransferError(f"stream broke: {type(exc).__name__}: {exc}") from exc
            if not chunk:
                raise TransferError(f"stream ended after {len(self._buf)} of {n} bytes")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def recv(self) -> WireModel:
        """The next frame.

        Raises:
            ProtocolViolation: oversized, undecodable or schema-invalid frame.
            TransferError: the stream ended or broke.
        """
        (length,) = _LEN.unpack(await self._read_exact(4))
        if length > self.max_frame:
            raise ProtocolViolation(f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")
        return decode_payload(await self._read_exact(length))

    def has_frame(self) -> bool:
        """Whether a whole frame is already buffered, so :meth:`recv` returns it without waiting."""
        return len(self._buf) >= 4 and len(self._buf) >= 4 + _LEN.unpack_from(self._buf)[0]

    async def send(self, frame: WireModel) -> None:
        """Write one frame.

        Raises:
            ProtocolViolation: the frame is too large to send.
            TransferError: the stream broke.
        """
        data = encode(frame, self.max_frame)
        try:
            await self.stream.write(data)
        except (OSError, EOFError, BaseLibp2pError) as exc:
            raise TransferError(f"stream broke: {type(exc).__name__}: {exc}") from exc
