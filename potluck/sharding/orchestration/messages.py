"""The tensor-parallel control messages: sharding owns their schemas, the overlay only carries them.

RPC ``tp_join`` asks a node to be one rank of a group (:class:`TpJoinRequest`); the node answers
with :class:`TpJoinReply` once it has accepted the work. The overlay's RPC carries each one as an
opaque, size-bounded payload inside its own frame (it checks the frame's length and envelope, not
what is inside); this module turns payloads into models and back. A payload is msgpack (spec:
https://github.com/msgpack/msgpack/blob/master/spec.md) of one map, validated into a frozen, strict
pydantic model that refuses unknown fields (``extra="forbid"``) and out-of-range values, after a
length check made before anything is decoded. Nothing is unpickled or evaluated.

The ``/potluck/tp-star/1`` stream hello (session id and rank) is the overlay's own frame; it reaches
this side as plain, already validated values (:class:`potluck.overlay.tp_port.TensorParallelPort`).
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from potluck.errors import ProtocolViolation

#: Largest encoded message, bytes (the plan, at most 64 KiB, dominates a join request).
MAX_MESSAGE_BYTES = 96 << 10
_HEX = r"^[0-9a-f]+$"
_CACHE_KEY = r"^[0-9A-Za-z._-]{1,128}$"


class TpMessage(BaseModel):
    """Base of the tensor-parallel messages: frozen, strict, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    def to_msgpack(self) -> bytes:
        """The message as msgpack bytes (the payload the overlay carries).

        Raises:
            ProtocolViolation: the encoding exceeds :data:`MAX_MESSAGE_BYTES`.
        """
        payload: bytes = msgpack.packb(self.model_dump(mode="python"), use_bin_type=True)
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ProtocolViolation(f"{type(self).__name__} of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
        return payload

    @classmethod
    def from_msgpack(cls, payload: bytes) -> Self:
        """Validate a payload into this message type.

        Raises:
            ProtocolViolation: too long, not msgpack, not a map, or fails the schema (wrong ``t``
                included).
        """
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ProtocolViolation(f"{cls.__name__} payload of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
        try:
            obj = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise ProtocolViolation(f"undecodable {cls.__name__}: {exc}") from exc
        if not isinstance(obj, dict):
            raise ProtocolViolation(f"{cls.__name__} payload is a {type(obj).__name__}, not a map")
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            first = exc.errors()[0]["msg"]
            raise ProtocolViolation(f"invalid {cls.__name__}: {exc.error_count()} schema errors: {first}") from exc


class TpJoinRequest(TpMessage):
    """RPC ``tp_join``: the master asks this node to be ``rank`` of a tensor-parallel group.

    ``key`` is the group's 32-byte star session key; it travels only inside the admitted,
    Noise-encrypted RPC stream. The worker connects to one of ``star_addrs`` over direct TCP (or,
    per ``transport``, opens a ``/potluck/tp-star/1`` libp2p stream to the master instead) and
    fetches its shard, cached under (``model_sha256``, ``plan_hash``) and pinned by ``shard_sha256``.

    Attributes:
        model_sha256: hex SHA-256 of the master's whole GGUF file (the model's content address).
        plan_hash: the plan's id and this rank, e.g. ``3f2a...-r1`` (a plain cache-directory name).
        shard_sha256: hex SHA-256 of this rank's shard file.
    """

    t: Literal["tp_join"] = "tp_join"
    session: str = Field(min_length=32, max_length=32, pattern=_HEX)
    model: str = Field(min_length=1, max_length=256)
    rank: int = Field(ge=1, le=255)
    world_size: int = Field(ge=2, le=256)
    plan: bytes = Field(max_length=64 << 10)
    model_sha256: str = Field(min_length=64, max_length=64, pattern=_HEX)
    plan_hash: str = Field(pattern=_CACHE_KEY)
    shard_sha256: str = Field(min_length=64, max_length=64, pattern=_HEX)
    shard_bytes: int = Field(ge=0, le=1 << 40)
    key: bytes = Field(min_length=32, max_length=32)
    star_addrs: tuple[tuple[Annotated[str, Field(max_length=64)], Annotated[int, Field(ge=1, le=65535)]], ...] = Field(
        (), max_length=16
    )
    transport: Literal["auto", "tcp", "libp2p"]
    timeout_s: float = Field(gt=0.0, le=600.0)
    accuracy_level: int = Field(ge=0, le=4)


class TpJoinReply(TpMessage):
    """The worker accepted ``session``; ``free_ram`` is what it had free then, bytes."""

    t: Literal["tp_join_ok"] = "tp_join_ok"
    session: str = Field(min_length=32, max_length=32, pattern=_HEX)
    free_ram: int = Field(ge=0, le=1 << 50)
