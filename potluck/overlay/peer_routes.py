"""Routes to peers: forward a completion over RPC ``generate`` and resume it elsewhere on failure.

Candidate choice (IslandRun's "forward to a peer that serves the model"): peers whose signed
record announces the model, of the most trusted tier available (``Tier.OWN`` before
``Tier.COMMUNITY``), not excluded by backoff, ordered by load (queue depth + active requests),
then measured RTT. If the chosen peer fails mid-stream (connection broke, stalled past its deadline, generation
error), the route resumes on the next candidate of the same tier by replaying the prompt plus the
text already produced (``continuation``), so the client sees one uninterrupted completion. A
failed peer is excluded with capped exponential backoff (:meth:`OverlayService.record_failure`).

A model that no peer in the cluster state serves is looked up in the DHT (provider records
``/potluck/model/<id>``, :meth:`potluck.overlay.discovery.Discovery.find_model`) within
``DHT_LOOKUP_DEADLINE_S``; the providers found are dialled, admitted and synced, so their signed
records enter the state and the normal choice above applies (:meth:`PeerRouteProvider.discover`).
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
    PeerRefused,
    RequestError,
)
from potluck.identity import PeerId, Tier
from potluck.overlay import rpc
from potluck.overlay.generate_codec import logprobs_from_wire, message_to_wire, sampling_to_wire
from potluck.overlay.service import OverlayService
from potluck.overlay.state import SignedRecord
from potluck.overlay.wire import FinishFrame, GenerateRequest, TokenFrame
from potluck.routing.request import GenerationRequest
from potluck.routing.route import Finished, Route, RouteEvent, TextDelta
from potluck.routing.router import ModelListing

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 4
DHT_LOOKUP_DEADLINE_S = 10.0  # most time a request waits for a DHT lookup of an unknown model
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
    """A model served by peers of one trust tier.

    Attributes:
        model_id: the model.
        tier: trust tier of every peer this route may use (``OWN`` or ``COMMUNITY``).
    """

    def __init__(self, service: OverlayService, model_id: str, tier: Tier) -> None:
        self.service = service
        self.model_id = model_id
        self.tier = tier

    def candidates(self) -> list[PeerId]:
        """Peers to try, best first: least loaded, then lowest RTT."""
        s = self.service

        def score(r: SignedRecord) -> tuple[int, float]:
            link = s.links.get(r.peer_id)
            rtt = link.rtt_s if link is not None and link.rtt_s is not None else 1.0
            return (r.record.load.queue_depth + r.record.load.active, rtt)

        records = [r for r in s.peers_serving(self.model_id) if s.admission.trust_tier(r.peer_id) == self.tier]
        return [r.peer_id for r in sorted(records, key=score)]

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        """Forward ``request``; yield its deltas and one ``Finished`` (resuming on failure).

        Raises:
            ModelNotFound: no peer of this tier serves the model (any more).
            RequestError: the request itself is bad (not retried).
            NetworkError / GenerationError: every candidate failed (the last error).
        """
        produced: list[str] = []
        tokens_done = 0
        tried: set[PeerId] = set()
        last_error: Exception | None = None
        for _ in range(MAX_ATTEMPTS):
            peer = next((p for p in self.candidates() if p not in tried), None)
            if peer is None:
                break
            tried.add(peer)
            if produced:
                self.service.metrics.forward_resumes.inc()
                log.warning("resuming %s on peer %s after %d tokens", self.model_id, peer, tokens_done)
            wire = to_wire(request, "".join(produced), tokens_done)
            tokens_before = tokens_done
            try:
                async with aclosing(self._forward(peer, wire)) as batches:
                    async for batch in batches:  # one delta per batch of frames
                        frames = [f for f in batch if isinstance(f, TokenFrame)]
                        if frames:
                            n_tokens = sum(f.n_tokens for f in frames)
                            text = "".join(f.text for f in frames)
                            produced.append(text)
                            tokens_done += n_tokens
                            lps = tuple(lp for f in frames for lp in logprobs_from_wire(f.logprobs))
                            yield TextDelta(text, n_tokens, lps)
                        finish = batch[-1]
                        if isinstance(finish, FinishFrame):
                            self.service.record_success(peer)
                            # A resumed peer counted the replayed text as prompt; report the original.
                            yield Finished(
                                finish.finish_reason,
                                max(0, finish.prompt_tokens - tokens_before),
                                tokens_before + finish.completion_tokens,
                            )
                            return
                raise GenerationError(f"peer {peer} ended the stream without finishing")
            except RequestError:
                raise
            except PeerRefused as exc:
                last_error = exc
                self.service.record_failure(peer)
            except _PEER_FAULTS as exc:
                last_error = exc
                self.service.record_failure(peer)
                log.warning("peer %s failed serving %s: %s", peer, self.model_id, exc)
        if last_error is not None:
            raise last_error
        raise ModelNotFound(f"no reachable peer serves {self.model_id!r}")

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

    def route_for(self, model: str) -> Route | None:
        tiers = sorted({self.service.admission.trust_tier(r.peer_id) for r in self.service.peers_serving(model)})
        if not tiers:
            return None
        return PeerRoute(self.service, model, tiers[0])
