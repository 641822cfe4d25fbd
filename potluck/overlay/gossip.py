"""State deltas over gossipsub (topic ``/potluck/state/1``), sealed with the swarm key.

A delta is one signed :class:`~potluck.overlay.state.PeerRecord` (its wire bytes), sealed with
ChaCha20-Poly1305 (RFC 8439) under a key derived from the swarm name and secret, so a peer
without the secret can neither read deltas that reach it through the mesh nor inject any: the
topic validator drops messages that do not open, that are oversized, or that were forwarded by a
peer that has not passed admission. The record inside is then validated and merged by the node
(signature, sequence, expiry). Full-state anti-entropy over RPC (``state_sync``) repairs whatever
gossip misses; see :mod:`potluck.overlay.service`.

Gossipsub v1.1 (https://github.com/libp2p/specs/blob/master/pubsub/gossipsub/gossipsub-v1.1.md)
as implemented by py-libp2p 0.8; runs in the trio thread.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import anyio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from potluck.identity import PeerId
from potluck.overlay.admission import Admission
from potluck.overlay.host import Libp2pHost
from potluck.overlay.state import MAX_RECORD_BYTES

log = logging.getLogger(__name__)

TOPIC = "/potluck/state/1"
_NONCE = 12
_TAG = 16


class Sealer:
    """AEAD sealing of gossip payloads with a key derived from swarm name and secret."""

    def __init__(self, swarm: str, secret: str | None) -> None:
        key = hashlib.sha256(b"potluck-gossip/1\x00" + swarm.encode() + b"\x00" + (secret or "").encode()).digest()
        self._aead = ChaCha20Poly1305(key)
        self._aad = TOPIC.encode()

    def seal(self, data: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._aead.encrypt(nonce, data, self._aad)

    def open(self, data: bytes) -> bytes | None:
        """The plaintext, or ``None`` when the payload was not sealed with our key."""
        if len(data) < _NONCE + _TAG or len(data) > MAX_RECORD_BYTES + _NONCE + _TAG:
            return None
        try:
            return self._aead.decrypt(data[:_NONCE], data[_NONCE:], self._aad)
        except InvalidTag:
            return None


OnRecord = Callable[[PeerId, bytes], Awaitable[None]]


class StateGossip:
    """Publishes our record deltas and delivers those of others to ``on_record`` (trio side).

    Args:
        host: the libp2p host.
        admission: forwarders must be admitted.
        sealer: the swarm's AEAD.
        on_record: ``await on_record(origin, raw_record)`` for every delta that opened.
        heartbeat_s: gossipsub heartbeat (mesh maintenance) interval.
    """

    def __init__(
        self,
        host: Libp2pHost,
        admission: Admission,
        sealer: Sealer,
        on_record: OnRecord,
        heartbeat_s: int = 1,
    ) -> None:
        self.admission = admission
        self.sealer = sealer
        self.on_record = on_record
        self.router = GossipSub(
            [PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12, heartbeat_interval=heartbeat_s
        )
        self.pubsub = Pubsub(host.host, self.router)
        self.pubsub.set_topic_validator(TOPIC, self._validate, False)
        self.dropped = 0

    def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        peer = PeerId(forwarder.to_base58())
        if peer != self.admission.me and not self.admission.is_admitted(peer):
            # Common for a moment after connecting (gossip outruns admission); anti-entropy repairs it.
            log.debug("dropped gossip forwarded by %s, not (yet) admitted", peer)
            self.dropped += 1
            return False
        if self.sealer.open(msg.data) is None:
            self.dropped += 1
            log.info("dropped a gossip message from %s that does not open with the swarm key", peer)
            return False
        return True

    async def run(self, stack: AsyncExitStack, task_group: anyio.abc.TaskGroup) -> None:
        """Start pubsub + gossipsub inside ``stack`` and the delivery loop in ``task_group``."""
        # py-libp2p 0.8.1 starts a sweeper thread per Pubsub (seen-message cache) and never stops it.
        stack.callback(self.pubsub.seen_messages.stop)
        await stack.enter_async_context(background_trio_service(self.pubsub))
        await stack.enter_async_context(background_trio_service(self.router))
        await self.pubsub.wait_until_ready()
        subscription = await self.pubsub.subscribe(TOPIC)
        task_group.start_soon(self._deliver, subscription)

    async def _deliver(self, subscription: object) -> None:
        while True:
            msg = await subscription.get()  # type: ignore[attr-defined]
            origin = PeerId(ID(msg.from_id).to_base58())
            if origin == self.admission.me:
                continue
            raw = self.sealer.open(msg.data)
            if raw is not None:
                await self.on_record(origin, raw)

    async def publish(self, raw_record: bytes) -> None:
        """Send our record delta to the mesh."""
        await self.pubsub.publish(TOPIC, self.sealer.seal(raw_record))
