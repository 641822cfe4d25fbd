"""The overlay service the Node owns: libp2p host, admission, RPC, gossip, discovery, cluster view.

``async with OverlayService(...)`` starts, in order: the trio thread with the libp2p host (and,
inside it, admission, RPC, gossipsub and the DHT), then the asyncio-side loops (heartbeat of our
signed record, anti-entropy, expiry, RTT probes) and discovery (bootstrap, zeroconf). Exiting
stops them in reverse order; nothing is left running (threads, sockets, zeroconf).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
from libp2p.tools.anyio_service import background_trio_service
from prometheus_client import CollectorRegistry

from potluck.config import Settings
from potluck.errors import ClosedError, NetworkError, PeerRefused
from potluck.identity import NodeIdentity, PeerId
from potluck.overlay import rpc
from potluck.overlay.admission import PROTOCOL as ADMIT_PROTOCOL
from potluck.overlay.admission import Admission, admit_frames, announced_tier
from potluck.overlay.bridge import TrioThread
from potluck.overlay.dht import make_dht
from potluck.overlay.discovery import Discovery, DiscoveryHooks, bridged_dht
from potluck.overlay.gossip import Sealer, StateGossip
from potluck.overlay.host import Libp2pHost, listen_multiaddr
from potluck.overlay.nat.traversal import NatTraversal
from potluck.overlay.serving import LocalServing
from potluck.overlay.state import ClusterState, PeerRecord, SignedRecord, sign_record
from potluck.overlay.swarm_metrics import OverlayMetrics
from potluck.overlay.tp_port import TensorParallelPort
from potluck.overlay.tp_stream import Libp2pByteStream, StarStreamServer
from potluck.overlay.verification.verifier import Verifier
from potluck.overlay.wire import (
    ChallengeAnswer,
    ChallengeRequest,
    FinishFrame,
    GenerateRequest,
    PossessionProof,
    PossessionRequest,
    StateSyncRequest,
    StateSyncResponse,
    TokenFrame,
    TpJoinFrame,
    TpJoinReplyFrame,
)
from potluck.retry import Backoff
from potluck.tasks import TaskOwner

log = logging.getLogger(__name__)

RTT_INTERVAL_S = 10.0
PEER_EXCLUSION = Backoff(first_s=1.0, max_s=60.0)  # how long a failing peer is left out of routing
EXPIRY_INTERVAL_S = 1.0


@dataclass
class PeerLink:
    """What this node measured about a peer (not signed, not shared)."""

    rtt_s: float | None = None
    last_seen: float = 0.0  # Unix seconds of the last record or reply from it
    failures: int = 0
    excluded_until: float = 0.0  # monotonic; see :meth:`OverlayService.record_failure`


@dataclass
class _Sync:
    queue: asyncio.Queue[PeerId] = field(default_factory=lambda: asyncio.Queue(256))


class OverlayService:
    """One node's presence in the swarm.

    Args:
        settings: the node's settings (overlay section).
        identity: the node's key (its libp2p identity).
        local: what this node serves (local routes, load, hardware), for records and RPC ``generate``.
        registry: Prometheus registry to count into (the node's).
        version: software version announced in our record.
    """

    def __init__(
        self,
        settings: Settings,
        identity: NodeIdentity,
        local: LocalServing,
        registry: CollectorRegistry | None = None,
        version: str = "0",
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.peer_id = identity.peer_id
        self.local = local
        self.version = version
        self.metrics = OverlayMetrics(registry)
        self.state = ClusterState(settings.swarm, self.metrics)
        self.admission = Admission(
            self.peer_id,
            settings.swarm,
            settings.swarm_secret,
            settings.allowlist,
            settings.allowlist_only,
            self.metrics,
        )
        self.sealer = Sealer(settings.swarm, settings.swarm_secret)
        self.links: dict[PeerId, PeerLink] = {}
        self.started = False
        self.bridge = TrioThread(f"potluck-overlay-{self.peer_id[-6:]}", self._trio_main)
        self.p2p: Libp2pHost | None = None
        self.gossip: StateGossip | None = None
        self._seq = 0
        self._own: SignedRecord | None = None
        self._sync = _Sync()
        self._stack = AsyncExitStack()
        self._tasks = TaskOwner("overlay")
        self._admitting: dict[PeerId, anyio.Event] = {}
        self.dht: Any = None
        self.discovery: Discovery | None = None  # bootstrap, zeroconf, DHT; set while running
        self.nat: NatTraversal | None = None  # NAT traversal (issue 4), created in the trio thread
        # Tensor parallelism: set by the node (sharding's TensorParallelService implements the port);
        # ``None`` refuses tp_join and tp-star streams.
        self.tp: TensorParallelPort | None = None
        # Serving-quality checks (issue 14): set by the node; ``None`` refuses challenge/possession.
        self.verification: Verifier | None = None

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> OverlayService:
        try:
            await self._stack.enter_async_context(self.bridge)
            await self._stack.enter_async_context(self._tasks)
            await self.publish_own_record()
            self._tasks.start(self._heartbeat(), "heartbeat")
            self._tasks.start(self._anti_entropy(), "anti-entropy")
            self._tasks.start(self._expire(), "expiry")
            self._tasks.start(self._probe_rtt(), "rtt")
            self._tasks.start(self._watch_bridge(), "bridge-watch")
            discovery = Discovery(self._discovery_hooks(), self.settings)
            self.discovery = await self._stack.enter_async_context(discovery)
        except BaseException:
            await self._stack.aclose()
            raise
        self.started = True
        log.info("overlay up: peer %s in swarm %r at %s", self.peer_id, self.settings.swarm, ", ".join(self.addrs))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.started = False
        await self._stack.aclose()
        log.info("overlay stopped")

    @property
    def failed(self) -> asyncio.Event:
        """Set when a background loop of the service died (the node then shuts down)."""
        return self._tasks.failed

    @property
    def failure(self) -> BaseException | None:
        return self._tasks.failure

    def start_task(self, coro: Any, name: str) -> None:
        """Run a background coroutine owned by the service (cancelled and awaited on exit)."""
        self._tasks.start(coro, name)

    def _discovery_hooks(self) -> DiscoveryHooks:
        """What :class:`Discovery` may use of this service (called once the trio thread runs)."""

        def connected() -> list[PeerId]:
            return self.p2p.connected_peers() if self.p2p is not None else []

        return DiscoveryHooks(
            peer_id=self.peer_id,
            addrs=lambda: self.addrs,
            start_task=self.start_task,
            connect=self.connect,
            is_admitted=self.admission.is_admitted,
            is_connected=lambda peer: peer in connected(),
            has_peers=lambda: bool(connected()),
            own_record=lambda: self._own.raw if self._own is not None else None,
            model_ids=lambda: [ad.id for ad in self.local.model_ads()],
            dht=bridged_dht(self.bridge, self.dht) if self.dht is not None else None,
        )

    # ------------------------------------------------------------------ trio side
    async def _trio_main(self, ready: Callable[[], None]) -> None:
        s = self.settings
        self.p2p = p2p = Libp2pHost(self.identity, [listen_multiaddr(s.p2p_host, s.p2p_port)])
        p2p.set_handler(ADMIT_PROTOCOL, self._admit_handler)
        rpc.RpcServer(self.bridge, self, self.admission, self.metrics).install(p2p)
        StarStreamServer(self.bridge, self.admission, lambda: self if self.tp is not None else None).install(p2p)
        self.gossip = StateGossip(p2p, self.admission, self.sealer, self._on_gossip)
        self.nat = NatTraversal(p2p, s)
        self.nat.on_addrs_changed = self._republish_from_trio
        dht = make_dht(p2p, s.swarm) if s.dht_enabled else None
        async with p2p.running(), AsyncExitStack() as stack, anyio.create_task_group() as tg:
            await self.gossip.run(stack, tg)
            await stack.enter_async_context(self.nat.running())
            if dht is not None:
                await stack.enter_async_context(background_trio_service(dht))
                self.dht = dht
            tg.start_soon(self._connection_events, tg)
            ready()
            await anyio.sleep_forever()

    async def _connection_events(self, tg: anyio.abc.TaskGroup) -> None:
        assert self.p2p is not None
        async for kind, peer in self.p2p.events:
            if kind == "connected":
                tg.start_soon(self._admit_quietly, peer)
            elif peer not in self.p2p.connected_peers():
                self.admission.forget(peer)

    async def _admit_quietly(self, peer: PeerId) -> None:
        try:
            await self.ensure_admitted(peer)
        except (NetworkError, TimeoutError) as exc:
            log.info("admission with %s failed: %s", peer, exc)

    async def ensure_admitted(self, peer: PeerId) -> None:
        """(trio) Make sure ``peer`` and we admitted each other on the live connection.

        Raises:
            PeerRefused, ConnectError, TransferError, ProtocolViolation, TimeoutError.
        """
        assert self.p2p is not None
        if self.admission.is_admitted(peer):
            return
        pending = self._admitting.get(peer)
        if pending is not None:
            await pending.wait()
            if not self.admission.is_admitted(peer):
                raise PeerRefused(f"admission with {peer} failed")
            return
        self._admitting[peer] = done = anyio.Event()
        try:
            stream = await self.p2p.open_stream(peer, ADMIT_PROTOCOL)
            try:
                await self.admission.initiate(admit_frames(stream), peer)
            finally:
                await stream.close()
        finally:
            del self._admitting[peer]
            done.set()
        await self.bridge.call_asyncio(self._on_admitted, peer)

    async def _admit_handler(self, stream: Any, peer: PeerId) -> None:
        await self.admission.respond(admit_frames(stream), peer)
        await self.bridge.call_asyncio(self._on_admitted, peer)

    async def _republish_from_trio(self) -> None:
        await self.bridge.call_asyncio(self.publish_own_record)

    async def _on_gossip(self, origin: PeerId, raw: bytes) -> None:
        await self.bridge.call_asyncio(self._merge_from, origin, (raw,))

    # ------------------------------------------------------------------ asyncio side: state
    async def _on_admitted(self, peer: PeerId) -> None:
        link = self.links.setdefault(peer, PeerLink())
        link.last_seen = time.time()
        # A new admitted connection is a fresh start (e.g. the peer restarted): the routing backoff
        # earned by its previous connection no longer applies.
        link.failures, link.excluded_until = 0, 0.0
        try:
            self._sync.queue.put_nowait(peer)
        except asyncio.QueueFull:
            log.debug("anti-entropy queue full; %s waits for the periodic round", peer)

    async def _merge_from(self, origin: PeerId, raws: tuple[bytes, ...]) -> None:
        now = time.time()
        for signed in self.state.merge_all(raws, now):
            if signed.peer_id == self.peer_id:
                continue
            self.links.setdefault(signed.peer_id, PeerLink()).last_seen = now
            if self.p2p is not None and signed.record.addrs:
                await self.bridge.call(_add_addrs, self.p2p, signed.peer_id, signed.record.addrs)

    def _next_record(self) -> PeerRecord:
        s = self.settings
        now = time.time()
        self._seq = max(self._seq + 1, int(now * 1000))  # monotonic across restarts (ms clock)
        return PeerRecord(
            peer_id=self.peer_id,
            swarm=s.swarm,
            addrs=tuple(self.addrs),
            models=tuple(self.local.model_ads()),
            hardware=self.local.hardware(),
            load=self.local.load(),
            trust_tier=announced_tier(s),
            version=self.version,
            seq=self._seq,
            expires_at=now + s.state_ttl_s,
            attestations=self.verification.attestations() if self.verification is not None else (),
        )

    async def publish_own_record(self) -> SignedRecord:
        """Sign a fresh record of this node, merge it locally and gossip it."""
        signed = sign_record(self.identity, self._next_record())
        self._own = signed
        self.state.merge_record(signed)
        if self.gossip is not None:
            try:
                await self.bridge.call(self.gossip.publish, signed.raw)
            except (ClosedError, NetworkError) as exc:
                log.debug("gossip publish failed: %s", exc)
        return signed

    async def state_sync(self, peer: PeerId, request: StateSyncRequest) -> StateSyncResponse:
        """RPC ``state_sync`` (asyncio side): merge what the peer sent, return what it lacks."""
        await self._merge_from(peer, request.records)
        self.links.setdefault(peer, PeerLink()).last_seen = time.time()
        newer = self.state.newer_than(request.have)
        return StateSyncResponse(records=tuple(r.raw for r in newer[:4096]))

    async def sync_with(self, peer: PeerId) -> int:
        """One anti-entropy round with ``peer``; returns the number of records that changed our view.

        Raises:
            NetworkError: the round failed.
        """
        assert self.p2p is not None
        request = StateSyncRequest(have=self.state.digest(), records=(self._own.raw,) if self._own else ())
        await self.bridge.call(self.ensure_admitted, peer)
        resp = await self.bridge.call(rpc.state_sync, self.p2p, peer, request)
        before = self.state.digest()
        await self._merge_from(peer, resp.records)
        return sum(1 for p, seq in self.state.digest().items() if before.get(p) != seq)

    async def _watch_bridge(self) -> None:
        await self.bridge.crashed.wait()
        raise ClosedError(f"the libp2p host stopped: {self.bridge.failure!r}")

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.state_interval_s)
            await self.publish_own_record()

    async def _anti_entropy(self) -> None:
        interval = self.settings.anti_entropy_interval_s
        next_round = time.monotonic() + interval
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # races with the get() completing, and this task then outlives the overlay's stop.
                async with asyncio.timeout(max(0.0, next_round - time.monotonic())):
                    peer = await self._sync.queue.get()
                peers = [peer]
            except TimeoutError:
                peers = sorted(self.admission.admitted)
                next_round = time.monotonic() + interval
            for peer in peers:
                try:
                    await self.sync_with(peer)
                except (NetworkError, TimeoutError) as exc:
                    log.info("anti-entropy with %s failed: %s", peer, exc)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_S)
            for peer in self.state.expire(time.time()):
                log.info("peer %s left the view (record expired)", peer)
                self.links.pop(peer, None)

    async def _probe_rtt(self) -> None:
        while True:
            for peer in sorted(self.admission.admitted):
                await self.measure_rtt(peer)
            await asyncio.sleep(RTT_INTERVAL_S)

    async def measure_rtt(self, peer: PeerId) -> float | None:
        """Ping ``peer`` once; record and return the RTT in seconds (``None`` when it failed)."""
        assert self.p2p is not None
        try:
            rtt = await self.bridge.call(rpc.ping, self.p2p, peer)
        except (NetworkError, TimeoutError) as exc:
            log.debug("ping %s failed: %s", peer, exc)
            return None
        link = self.links.setdefault(peer, PeerLink())
        link.rtt_s = rtt if link.rtt_s is None else 0.7 * link.rtt_s + 0.3 * rtt
        link.last_seen = time.time()
        self.metrics.rtt.observe(rtt)
        return rtt

    # ------------------------------------------------------------------ peers, failures
    @property
    def addrs(self) -> list[str]:
        return self.p2p.addrs() if self.p2p is not None else []

    async def connect(self, addr: str) -> PeerId:
        """Dial ``addr`` (with ``/p2p/<peer ID>``), run admission and a first state sync.

        Raises:
            ConfigError, ConnectError, PeerRefused, NetworkError.
        """
        assert self.p2p is not None
        peer = await self.bridge.call(self.p2p.connect, addr)
        await self.bridge.call(self.ensure_admitted, peer)
        await self.sync_with(peer)
        return peer

    def record_failure(self, peer: PeerId) -> None:
        """Exclude a failing peer from routing with capped exponential backoff (1 s .. 60 s,
        :data:`PEER_EXCLUSION`: the formula of :mod:`potluck.retry`)."""
        link = self.links.setdefault(peer, PeerLink())
        link.failures += 1
        link.excluded_until = time.monotonic() + PEER_EXCLUSION.delay(link.failures)

    def record_success(self, peer: PeerId) -> None:
        link = self.links.setdefault(peer, PeerLink())
        link.failures = 0
        link.excluded_until = 0.0

    def is_excluded(self, peer: PeerId) -> bool:
        link = self.links.get(peer)
        return link is not None and link.excluded_until > time.monotonic()

    def peers_serving(self, model: str) -> list[SignedRecord]:
        """Records of other peers that announce ``model``, live and not excluded."""
        return [
            r
            for r in self.state.records()
            if r.peer_id != self.peer_id
            and any(m.id == model for m in r.record.models)
            and not self.is_excluded(r.peer_id)
        ]

    def cluster_view(self) -> dict[str, Any]:
        """The state view as JSON-ready data (``GET /api/cluster``)."""
        now = time.time()
        peers = []
        for signed in sorted(self.state.records(), key=lambda r: r.peer_id):
            rec = signed.record
            link = self.links.get(signed.peer_id, PeerLink())
            peers.append(
                {
                    "peer_id": rec.peer_id,
                    "self": rec.peer_id == self.peer_id,
                    "addrs": list(rec.addrs),
                    "models": [m.model_dump() for m in rec.models],
                    "hardware": rec.hardware.model_dump(),
                    "load": rec.load.model_dump(),
                    "trust_tier": self.admission.trust_tier(rec.peer_id),
                    "version": rec.version,
                    "seq": rec.seq,
                    "expires_in_s": round(rec.expires_at - now, 1),
                    "rtt_ms": None if link.rtt_s is None else round(link.rtt_s * 1000, 2),
                    "last_seen_s": None if not link.last_seen else round(now - link.last_seen, 1),
                    "admitted": rec.peer_id in self.admission.admitted,
                    "connection": self.nat.connection(rec.peer_id) if self.nat is not None else None,
                    "verification": self.verification.view(rec.peer_id) if self.verification is not None else None,
                }
            )
        view: dict[str, Any] = {"peer_id": self.peer_id, "swarm": self.settings.swarm, "addrs": self.addrs}
        view["peers"] = peers
        if self.nat is not None:
            view["nat"] = self.nat.status()
        return view

    # ------------------------------------------------------------------ verification (issue 14)
    def signed_records(self) -> list[SignedRecord]:
        return self.state.records()

    def is_admitted(self, peer: PeerId) -> bool:
        return self.admission.is_admitted(peer)

    async def call_challenge(self, peer: PeerId, request: ChallengeRequest) -> ChallengeAnswer:
        """Send a verification challenge to ``peer`` (:func:`rpc.challenge`, its deadline)."""
        assert self.p2p is not None
        await self.bridge.call(self.ensure_admitted, peer)
        return await self.bridge.call(rpc.challenge, self.p2p, peer, request)

    async def call_possession(self, peer: PeerId, request: PossessionRequest) -> PossessionProof:
        """Ask ``peer`` for chunks of a model file with Merkle proofs (:func:`rpc.possession`)."""
        assert self.p2p is not None
        await self.bridge.call(self.ensure_admitted, peer)
        return await self.bridge.call(rpc.possession, self.p2p, peer, request)

    async def challenge(self, peer: PeerId, request: ChallengeRequest) -> ChallengeAnswer:
        """RPC ``challenge``. Raises ModelNotFound (no such file here), Overloaded, PeerRefused."""
        if self.verification is None:
            raise PeerRefused("this node answers no verification challenges")
        return await self.verification.answer_challenge(request)

    async def possession(self, peer: PeerId, request: PossessionRequest) -> PossessionProof:
        """RPC ``possession``. Raises ModelNotFound (no such file here), RequestError, PeerRefused."""
        if self.verification is None:
            raise PeerRefused("this node answers no verification challenges")
        return await self.verification.answer_possession(request)

    # ------------------------------------------------------------------ RPC app (asyncio side)
    async def generate(self, peer: PeerId, request: GenerateRequest) -> AsyncIterator[TokenFrame | FinishFrame]:
        """RPC ``generate``: run the request on this node's own model (never forwarded again)."""
        async for event in self.local.serve(request):
            yield event

    async def tp_join(self, peer: PeerId, request: TpJoinFrame) -> TpJoinReplyFrame:
        """RPC ``tp_join``: become a worker of ``peer``'s tensor-parallel group (payloads opaque here).

        Raises:
            PeerRefused: this node takes no tensor-parallel work, or not this one.
            ProtocolViolation: the payload fails the tensor-parallel side's schema.
        """
        if self.tp is None:
            raise PeerRefused("this node does not take tensor-parallel work")
        return TpJoinReplyFrame(payload=await self.tp.join(peer, request.payload))

    async def tp_accept_stream(self, peer: PeerId, session: str, rank: int, stream: Libp2pByteStream) -> None:
        """A worker's tp-star stream (libp2p fallback of the star): hand it to the waiting group.

        Raises:
            PeerRefused: no such group, or ``peer`` was not invited as that rank.
        """
        if self.tp is None:
            raise PeerRefused("this node runs no tensor-parallel group")
        await self.tp.accept_stream(peer, session, rank, stream)


async def _add_addrs(p2p: Libp2pHost, peer: PeerId, addrs: tuple[str, ...]) -> None:
    p2p.add_addrs(peer, addrs)
