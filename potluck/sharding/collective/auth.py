"""Mutual HMAC-SHA256 challenge/response over a :class:`~potluck.sharding.collective.channel.FrameChannel`.

Both ends hold the same per-session key (32 random bytes from the master, later agreed over the
authenticated libp2p channel). Each side proves knowledge of the key over both fresh nonces and the
initiator's claimed identity (the HELLO fields), with a distinct role label per direction, so a proof
can be neither replayed nor reflected (the classic ISO/IEC 9798-4 three-pass mutual scheme)::

    initiator -> HELLO     {fields..., "nonce": Ni}
    responder -> CHALLENGE {"nonce": Nr, "proof": prove(K, TP_RESPONDER, Ni, Nr, ctx)}
    initiator -> AUTH      {"proof": prove(K, TP_INITIATOR, Nr, Ni, ctx)}
    responder -> AUTH_OK   {}            (or REFUSED {"reason": str} at any step)

``ctx`` is the canonical msgpack of the HELLO fields other than the nonce. ``prove`` and its
constant-time check are :mod:`potluck.handshake`'s (HMAC-SHA256 over length-prefixed fields under
a label per role, :class:`~potluck.handshake.Label`). Every failure is fail-closed and raises
:class:`~potluck.errors.PeerRefused` (wrong key, refused identity) or
:class:`~potluck.errors.ProtocolViolation` (malformed handshake).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import msgpack

from potluck.errors import PeerRefused, ProtocolViolation, TransferError
from potluck.handshake import MAC_BYTES, NONCE_BYTES, Label, new_nonce, prove, verify
from potluck.sharding.collective.channel import FrameChannel
from potluck.sharding.collective.frames import Kind

__all__ = ["HANDSHAKE_MAX_FRAME", "KEY_BYTES", "check_key", "initiate", "new_session_key", "respond"]

log = logging.getLogger(__name__)

KEY_BYTES = 32
HANDSHAKE_MAX_FRAME = 4096


def new_session_key() -> bytes:
    """A fresh random 32-byte session key (``secrets.token_bytes``)."""
    return secrets.token_bytes(KEY_BYTES)


def check_key(key: bytes) -> bytes:
    """Validate a session key.

    Raises:
        ValueError: not bytes of exactly :data:`KEY_BYTES` length.
    """
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ValueError(f"session key must be {KEY_BYTES} bytes")
    return bytes(key)


def _context(hello: dict[str, Any]) -> bytes:
    fields = sorted((k, v) for k, v in hello.items() if k != "nonce")
    return msgpack.packb(fields, use_bin_type=True)


def _bytes_field(header: dict[str, Any], name: str, size: int) -> bytes:
    value = header.get(name)
    if not isinstance(value, bytes) or len(value) != size:
        raise ProtocolViolation(f"handshake field {name!r} must be {size} bytes")
    return value


def _expect(channel: FrameChannel, kind: Kind, deadline: float) -> dict[str, Any]:
    frame = channel.recv(deadline=deadline, max_frame_bytes=HANDSHAKE_MAX_FRAME)
    if frame.kind is Kind.REFUSED:
        reason = frame.header.get("reason")
        raise PeerRefused(f"{channel.peer} refused us: {reason if isinstance(reason, str) else '?'}")
    if frame.kind is not kind or frame.array is not None:
        raise ProtocolViolation(f"handshake: got {frame.kind.name}, expected {kind.name}")
    return frame.header


def _refuse(channel: FrameChannel, reason: str, deadline: float) -> None:
    """Tell the peer why (best effort: it may already be gone), then the caller raises."""
    try:
        channel.send(Kind.REFUSED, {"reason": reason}, deadline=min(deadline, time.monotonic() + 1.0))
    except (TransferError, ProtocolViolation) as exc:
        log.debug("could not send REFUSED to %s: %s", channel.peer, exc)


def initiate(channel: FrameChannel, key: bytes, hello: dict[str, Any], *, deadline: float) -> None:
    """Run the initiator side (the worker, or the receiver of a shard).

    Args:
        channel: fresh channel (no frames exchanged yet).
        key: the 32-byte session key.
        hello: identity fields (msgpack-able, without "nonce") the responder checks and both bind into
            their proofs, e.g. ``{"role": "star", "rank": 2, "world_size": 4}``.
        deadline: absolute monotonic deadline for the whole handshake.

    Raises:
        PeerRefused: the responder does not know the key, or refused our identity.
        ProtocolViolation: malformed handshake frames.
        TransferError: connection lost or deadline passed.
    """
    key = check_key(key)
    nonce_i = new_nonce()
    channel.send(Kind.HELLO, {**hello, "nonce": nonce_i}, deadline=deadline)
    challenge = _expect(channel, Kind.CHALLENGE, deadline)
    nonce_r = _bytes_field(challenge, "nonce", NONCE_BYTES)
    ctx = _context(hello)
    if not verify(key, Label.TP_RESPONDER, _bytes_field(challenge, "proof", MAC_BYTES), nonce_i, nonce_r, ctx):
        _refuse(channel, "authentication failed", deadline)
        raise PeerRefused(f"{channel.peer} failed authentication (wrong session key?)")
    channel.send(Kind.AUTH, {"proof": prove(key, Label.TP_INITIATOR, nonce_r, nonce_i, ctx)}, deadline=deadline)
    _expect(channel, Kind.AUTH_OK, deadline)


def respond(
    channel: FrameChannel,
    key: bytes,
    admit: Callable[[dict[str, Any]], None],
    *,
    deadline: float,
) -> dict[str, Any]:
    """Run the responder side (the master, or the sender of a shard).

    Args:
        channel: fresh channel (no frames exchanged yet).
        key: the 32-byte session key.
        admit: checks the HELLO fields (without "nonce"); raises :class:`PeerRefused` with a reason to
            refuse (e.g. rank out of range or already taken). Called before any proof is sent.
        deadline: absolute monotonic deadline for the whole handshake.

    Returns:
        The initiator's HELLO fields (without "nonce"), once it proved knowledge of the key.

    Raises:
        PeerRefused: identity refused or wrong key (the peer was told why, then refused).
        ProtocolViolation: malformed handshake frames.
        TransferError: connection lost or deadline passed.
    """
    key = check_key(key)
    hello = _expect(channel, Kind.HELLO, deadline)
    nonce_i = _bytes_field(hello, "nonce", NONCE_BYTES)
    fields = {k: v for k, v in hello.items() if k != "nonce"}
    try:
        admit(fields)
    except PeerRefused as exc:
        _refuse(channel, str(exc), deadline)
        raise
    nonce_r = new_nonce()
    ctx = _context(fields)
    proof_r = prove(key, Label.TP_RESPONDER, nonce_i, nonce_r, ctx)
    channel.send(Kind.CHALLENGE, {"nonce": nonce_r, "proof": proof_r}, deadline=deadline)
    auth = _expect(channel, Kind.AUTH, deadline)
    if not verify(key, Label.TP_INITIATOR, _bytes_field(auth, "proof", MAC_BYTES), nonce_r, nonce_i, ctx):
        _refuse(channel, "authentication failed", deadline)
        raise PeerRefused(f"{channel.peer} failed authentication (wrong session key?)")
    channel.send(Kind.AUTH_OK, None, deadline=deadline)
    return fields
