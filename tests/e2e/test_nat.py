"""NAT traversal end to end: real ``potluck node start`` processes in an emulated internet.

Each test builds (with :mod:`tests.netem`) two public relays (``--relay``, the first also the
bootstrap node) and two homes behind NAT routers: node A (no model) and node B (serves the model).
A chat request sent to A for B's model must come back complete (finished, counted) - the same text
with greedy decoding over every path - and the path A uses to reach B is asserted:

* EIM NAT + EIM NAT: hole-punched (DCUtR upgrades the relayed connection; TCP simultaneous open).
* EIM NAT + symmetric NAT, symmetric + symmetric: relayed (punching cannot work), and it stays so.

A fourth test kills the relay B holds its only reservation on and checks that B re-reserves on the
other relay, advertises the new circuit address and is reachable from A again.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.natnet import SETTLING, NatNode, Swarm, nat_swarm
from tests.helpers import until
from tests.netem import NatType, missing_requirements

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.netns,
    pytest.mark.timeout(420),
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

MODEL = "tinyshakespeare-q8_0"
PROMPT = "ROMEO:"
MAX_TOKENS = 24
PUNCH_WAIT_S = 90.0  # DCUtR: first attempt ~2 s after the relayed connection, 3 rounds of <= 7 s
STAYS_RELAYED_S = 30.0
CONNECTION_S = 60.0  # bound on (re)establishing A's connection to B: RTT rounds + relay dials


def _chat_through_a(s: Swarm, timeout: float = 120.0) -> str:
    """A complete answer from B's model, asked at A: finished (stop or length), non-empty, counted."""

    def attempt() -> str | None:
        out = s.a.chat(MODEL, PROMPT, MAX_TOKENS, timeout=60)
        choice = out["choices"][0]
        assert choice["finish_reason"] in ("stop", "length"), out
        assert choice["message"]["content"].strip(), out
        assert 0 < out["usage"]["completion_tokens"] <= MAX_TOKENS, out
        return choice["message"]["content"]  # type: ignore[no-any-return]

    return until(attempt, timeout, "a chat answered through A", retry_on=SETTLING)


def _path(viewer: NatNode, peer: str) -> dict | None:
    entry = viewer.peer(peer)
    return entry and entry["connection"]


def _wait_private(s: Swarm) -> None:
    for node in (s.a, s.b):
        until(
            lambda n=node: n.cluster()["nat"]["reachability"] == "private",
            90,
            f"AutoNAT private at {node.ns.name}",
            retry_on=SETTLING,
        )
        until(
            lambda n=node: n.cluster()["nat"]["relays"], 60, f"a relay reservation at {node.ns.name}", retry_on=SETTLING
        )
    for relay in s.relays:
        assert relay.cluster()["nat"]["relays"] == []  # a public relay reserves nothing


@pytest.fixture
def eim_eim(tmp_path: Path, model_path) -> Iterator[Swarm]:
    with nat_swarm(tmp_path, model_path("q8_0"), NatType.EIM, NatType.EIM) as swarm:
        yield swarm


@pytest.fixture
def eim_sym(tmp_path: Path, model_path) -> Iterator[Swarm]:
    with nat_swarm(tmp_path, model_path("q8_0"), NatType.EIM, NatType.SYMMETRIC) as swarm:
        yield swarm


@pytest.fixture
def sym_sym(tmp_path: Path, model_path) -> Iterator[Swarm]:
    with nat_swarm(tmp_path, model_path("q8_0"), NatType.SYMMETRIC, NatType.SYMMETRIC) as swarm:
        yield swarm


@pytest.fixture
def sym_sym_one_relay(tmp_path: Path, model_path) -> Iterator[Swarm]:
    env = {"POTLUCK_NAT_RELAYS": "1"}
    with nat_swarm(tmp_path, model_path("q8_0"), NatType.SYMMETRIC, NatType.SYMMETRIC, b_env=env) as swarm:
        yield swarm


def test_eim_and_eim_nat_hole_punch_to_a_direct_path(eim_eim: Swarm) -> None:
    s = eim_eim
    _wait_private(s)
    expected = _chat_through_a(s)  # greedy: every later answer over any path must be the same text
    # DCUtR upgrades the relayed connection: both sides see a hole-punched direct connection.
    path = until(
        lambda: (p := _path(s.a, s.b.peer_id)) and p["kind"] == "hole-punched" and p,
        PUNCH_WAIT_S,
        "hole punch",
        retry_on=SETTLING,
    )
    assert path["relay"] is None and s.b.ns.ip not in str(path["addr"])  # the router's WAN address, not the LAN
    assert until(
        lambda: (p := _path(s.b, s.a.peer_id)) and p["kind"] == "hole-punched", 30, "punch seen by B", retry_on=SETTLING
    )
    assert _chat_through_a(s) == expected  # and requests run over it


@pytest.mark.parametrize("topology", ["eim_sym", "sym_sym"])
def test_symmetric_nat_stays_relayed(topology: str, request: pytest.FixtureRequest) -> None:
    s: Swarm = request.getfixturevalue(topology)
    _wait_private(s)
    expected = _chat_through_a(s)  # greedy: every later answer over any path must be the same text
    relay_ids = {r.peer_id for r in s.relays}
    # A circuit may end after the chat (relay limits); A dials B again on its next RTT round (10 s),
    # and a relay dial may take up to 15 s: on a loaded 2-core machine two rounds can pass.
    path = until(lambda: _path(s.a, s.b.peer_id), CONNECTION_S, "A's connection to B", retry_on=SETTLING)
    assert path["kind"] == "relayed" and path["relay"] in relay_ids
    # Hole punching is attempted and fails (random ports): the connection stays on the relay.
    deadline = time.monotonic() + STAYS_RELAYED_S
    while time.monotonic() < deadline:
        for viewer, peer in ((s.a, s.b.peer_id), (s.b, s.a.peer_id)):
            p = _path(viewer, peer)  # None for a moment while a circuit is replaced: still no direct path
            assert p is None or all(x["kind"] == "relayed" and x["relay"] in relay_ids for x in p["paths"]), p
        time.sleep(2)  # sampling the path over a window of time is the test (it must stay relayed)
    assert _chat_through_a(s) == expected
    assert until(lambda: _path(s.a, s.b.peer_id), CONNECTION_S, "A's connection to B", retry_on=SETTLING)["kind"] == (
        "relayed"
    )


def test_lost_relay_is_replaced_and_the_node_stays_reachable(sym_sym_one_relay: Swarm) -> None:
    s = sym_sym_one_relay
    _wait_private(s)
    expected = _chat_through_a(s)  # greedy: every later answer over any path must be the same text
    held = s.b.cluster()["nat"]["relays"]
    assert len(held) == 1
    lost = next(r for r in s.relays if r.peer_id == held[0])
    other = next(r for r in s.relays if r.peer_id != held[0])
    lost.stop(signal.SIGKILL)
    # B notices, reserves on the other relay and advertises the new circuit address...
    until(
        lambda: s.b.cluster()["nat"]["relays"] == [other.peer_id],
        60,
        "re-reservation on the other relay",
        retry_on=SETTLING,
    )
    circuit = f"/p2p/{other.peer_id}/p2p-circuit/p2p/{s.b.peer_id}"
    until(
        lambda: any(circuit in a for a in s.a.peer(s.b.peer_id)["addrs"]),
        60,
        "new circuit address at A",
        retry_on=SETTLING,
    )
    # ...and A reaches it through that relay again.
    assert _chat_through_a(s, timeout=180) == expected
    # A circuit may end after the chat (relay limits); A dials B again on its next RTT round (10 s),
    # and a relay dial may take up to 15 s: on a loaded 2-core machine two rounds can pass.
    path = until(lambda: _path(s.a, s.b.peer_id), CONNECTION_S, "A's connection to B", retry_on=SETTLING)
    assert path["kind"] == "relayed" and path["relay"] == other.peer_id
