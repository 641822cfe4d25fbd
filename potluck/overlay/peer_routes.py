"""Routes to peers: one candidate per peer that serves a model, forwarded over RPC ``generate``.

:class:`PeerRouteProvider` gives the router (:mod:`potluck.routing.router`) one
:class:`~potluck.routing.candidates.Candidate` per peer whose signed record announces the model,
with what the score needs: the peer's advertised decode speed (``Hardware.decode_tps``), its queue
(``Load``), the measured RTT and its trust tier; peers in backoff after a failure or that failed
verification are included with the reason, so ``potluck route explain`` shows them. Choosing among
them, and resuming a broken stream on the next candidate (replaying the prompt plus the text
already produced as ``continuation``), is the router's (:mod:`potluck.routing.plan`). A failed peer
is excluded with capped exponential backoff (:meth:`OverlayService.record_failure`).

A model that no peer in the cluster state serves is looked up in the DHT (provider records
``/potluck/model/<id>``, :meth:`potluck.overlay.discovery.Discovery.find_model`) within
``DHT_LOOKUP_DEADLINE_S``; the providers found are dialled, admitted and synced, so their signed
records enter the state (:meth:`PeerRouteProvider.discover`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing

from potluck.errors import (
    ConnectError,
    GenerationError,
    ModelLoading,
    ModelNotFound,
    NetworkError,
    Overloaded,
)
from potluck.identity import PeerId, Tier
from potluck.overlay import rpc
from potluck.overlay.generate_codec import logprobs_from_wire, message_to_wire, sampling_to_wire
from potluck.overlay.service import OverlayService
from potluck.overlay.wire import FinishFrame, GenerateRequest, TokenFrame
from potluck.routing.candidates import Candidate
from potluck.routing.request import GenerationRequest
from potluck.routing.route import Finished, Route, RouteEvent, TextDelta
from potluck.routing.router import ModelListing

log = logging.getLogger(__name__)

DHT_LOOKUP_DEADLINE_S = 10.0  # most time a request waits for a DHT lookup of an unknown model
REFRESH_DEADLINE_S = 3.0  # most time a failing request waits for a state sync before giving up
# Errors after which another peer may succeed (the peer, not the request, is at fault).
_PEER_FAULTS = (NetworkError, GenerationError, Overloaded, ModelNotFound, ModelLoading)


def to_wire(request: GenerationRequest, continuation: str, tokens_done: int) -> GenerateRequest:
    """The RPC form of ``request``, resumed after ``continuation`` (``tokens_done`` tokens)."""
    p = request.params
    return GenerateRequest(
        model=request.model,
        params=sampling_to_wire(p, max(1, p.max_tokens - tokens_done)),
        prompt=request.prompt,
        messages=tuple(message_to_wire(m) for m in request.messages) if request.messages is not None else None,
        continuation=continuation,
        headers=tuple(request.headers),
        tools=request.tools,
    )


class PeerRoute:
    """A model served by one peer (a candidate of the router: one per peer).

    Failover across peers (and tiers) is the router's (:class:`potluck.routing.plan.PlannedRoute`);
    this route records each outcome in the overlay's per-peer backoff (:meth:`OverlayService.record_failure`).

    Attributes:
        model_id: the model.
        peer: the peer that serves it.
        tier: the peer's trust tier (``OWN`` or ``COMMUNITY``) as this node places it.
    """

    def __init__(self, service: OverlayService, model_id: str, peer: PeerId, tier: Tier) -> None:
        self.service = service
        self.model_id = model_id
        self.peer = peer
        self.tier = tier

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        """Forward ``request`` (resumed after ``request.continuation``); yield its deltas and one ``Finished``.

        Raises:
            RequestError: the request itself is bad (the peer is not blamed).
            NetworkError / GenerationError / Overloaded / ModelNotFound / ModelLoading: the peer
                failed (it is excluded with backoff).
        """
        peer = self.peer
        if request.continuation:
            self.service.metrics.forward_resumes.inc()
        wire = to_wire(request, request.continuation, 0)
        try:
            async with aclosing(self._forward(peer, wire)) as batches:
                async for batch in batches:  # one delta per batch of frames
                    frames = [f for f in batch if isinstance(f, TokenFrame)]
                    if frames:
                        lps = tuple(lp for f in frames for lp in logprobs_from_wire(f.logprobs))
                        yield TextDelta("".join(f.text for f in frames), sum(f.n_tokens for f in frames), lps)
                    finish = batch[-1]
                    if isinstance(finish, FinishFrame):
                        self.service.record_success(peer)
                        yield Finished(finish.finish_reason, finish.prompt_tokens, finish.completion_tokens)
                        return
            raise GenerationError(f"peer {peer} ended the stream without finishing")
        except _PEER_FAULTS as exc:
            self.service.record_failure(peer)
            log.warning("peer %s failed serving %s: %s", peer, self.model_id, exc)
            raise
        except TimeoutError as exc:  # admission with the peer ran past its deadline
            self.service.record_failure(peer)
            raise ConnectError(f"peer {peer} did not complete admission in time") from exc

    async def _forward(
        self, peer: PeerId, wire: GenerateRequest
    ) -> AsyncGenerator[list[TokenFrame | FinishFrame], None]:
        """The peer's frames in batches (one bridge crossing each; see :func:`rpc.generate`)."""
        s = self.service
        if s.p2p is None:
            raise ConnectError("the overlay is not running")
        await s.bridge.call(s.ensure_admitted, peer)
        async for batch in s.bridge.stream(rpc.generate, s.p2p, peer, wire):
            yield batch


class PeerRouteProvider:
    """The router's source of swarm routes (:class:`potluck.routing.router.RouteProvider`)."""

    def __init__(self, service: OverlayService) -> None:
        self.service = service

    def listings(self) -> list[ModelListing]:
        seen: dict[str, ModelListing] = {}
        for r in self.service.state.records():
            if r.peer_id == self.service.peer_id:
                continue
            for m in r.record.models:
                seen.setdefault(m.id, ModelListing(m.id, r.peer_id))
        return list(seen.values())

    async def discover(self, model: str) -> bool:
        """Find providers of ``model`` in the DHT and join them (``RouteDiscoverer``).

        Returns:
            True when a peer in the cluster state now serves ``model``. False when none does,
            the overlay or its DHT is off, or the lookup failed or ran past
            ``DHT_LOOKUP_DEADLINE_S`` (logged).
        """
        discovery = self.service.discovery
        if discovery is None or not self.service.started:
            return False
        try:
            async with asyncio.timeout(DHT_LOOKUP_DEADLINE_S):
                found = await discovery.find_model(model)
        except TimeoutError:
            log.info("DHT lookup of %s ran past %.0f s", model, DHT_LOOKUP_DEADLINE_S)
            return bool(self.service.peers_serving(model))
        except NetworkError as exc:
            log.info("DHT lookup of %s failed: %s", model, exc)
            return False
        if found:
            log.info("found %s through the DHT at %s", model, ", ".join(found))
        return bool(self.service.peers_serving(model))

    async def refresh(self, model: str) -> None:
        """Bring the view up to date before the router gives up on ``model``: one anti-entropy
        round (admission first where needed) with every admitted, connected or known peer,
        concurrently, within ``REFRESH_DEADLINE_S`` (``RouteRefresher``).

        Why: a peer's record reaches us by gossip; a peer that restarted announces its model when
        the load finishes, and if that gossip has not arrived (its mesh is still forming) our view
        still holds its model-less first record, so the peer that is alive and could resume a
        broken stream is no candidate. Failures are logged; it never raises.
        """
        s = self.service
        if not s.started or s.p2p is None:
            return
        # Admitted, connected (a restarted peer may be connected but not yet, or no longer, admitted:
        # sync_with admits it first) and every peer in the view.
        known = {r.peer_id for r in s.state.records()}
        peers = sorted((set(s.admission.admitted) | set(s.p2p.connected_peers()) | known) - {s.peer_id})

        async def one(peer: PeerId) -> None:
            try:
                await s.sync_with(peer)
            except (NetworkError, TimeoutError) as exc:
                log.info("refresh: anti-entropy with %s failed: %s", peer, exc)

        try:
            async with asyncio.timeout(REFRESH_DEADLINE_S), asyncio.TaskGroup() as tg:
                for peer in peers:
                    tg.create_task(one(peer))
        except TimeoutError:
            log.info("refresh of the view for %s ran past %.0f s", model, REFRESH_DEADLINE_S)

    def candidates(self, model: str) -> list[Candidate]:
        """One candidate per peer whose signed record announces ``model`` (``RouteProvider``):
        its advertised decode speed, queue (depth + active), measured RTT and trust tier. A peer
        in backoff after a failure, or one that failed verification, is included with the reason."""
        s = self.service
        verified = getattr(s, "verification", None)
        out = []
        for r in s.state.records():
            if r.peer_id == s.peer_id or not any(m.id == model for m in r.record.models):
                continue
            link = s.links.get(r.peer_id)
            excluded = backoff = None
            if verified is not None and (why := verified.excluded(r.peer_id)) is not None:
                excluded = f"failed verification: {why}"
            elif s.is_excluded(r.peer_id):
                assert link is not None
                backoff = f"in backoff after {link.failures} failure(s)"
            tier = s.admission.trust_tier(r.peer_id)
            load = r.record.load
            out.append(
                Candidate(
                    key=f"peer:{r.peer_id}",
                    kind="peer",
                    target=r.peer_id,
                    route=PeerRoute(s, model, r.peer_id, tier),
                    decode_tps=r.record.hardware.decode_tps or None,
                    queue=load.queue_depth + load.active,
                    rtt_s=None if link is None else link.rtt_s,
                    peer=r.peer_id,
                    excluded=excluded,
                    backoff=backoff,
                )
            )
        return out

    def route_for(self, model: str) -> Route | None:
        """The best-placed peer's route for ``model`` (least loaded, then lowest RTT), or ``None``."""
        usable = [c for c in self.candidates(model) if c.excluded is None and c.backoff is None]
        usable.sort(key=lambda c: (c.tier, c.queue, c.rtt_s if c.rtt_s is not None else 1.0))
        return usable[0].route if usable else None
