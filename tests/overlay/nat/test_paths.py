"""Classification of connections into direct / hole-punched / relayed (potluck.overlay.nat.paths)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multiaddr import Multiaddr

from potluck.overlay.nat.paths import Path, best, classify, relay_of

RELAY = "12D3KooWF3CUoGbikkiE6e6CeTo8i967MaAzwcPysdG3a7nZ8doa"
ME = "12D3KooWNfHf53Ymix9YQU5M8e2aiVqpAcRbA8cPcdeBK134CWXL"
PEER = "12D3KooW9v4vYp468JaC5JQ4aUczUSooXfwQsUcKMPix2sbRPx83"


@dataclass
class _Id:
    b58: str

    def to_base58(self) -> str:
        return self.b58


@dataclass
class _Muxed:
    peer_id: _Id


@dataclass
class _Stream:
    muxed_conn: _Muxed


@dataclass
class _Raw:
    stream: _Stream


@dataclass
class _Secured:
    conn: _Raw


@dataclass
class _Conn:
    addrs: list[str]
    muxed_conn: Any = None

    def get_transport_addresses(self) -> list[Multiaddr]:
        return [Multiaddr(a) for a in self.addrs]


def test_relay_of() -> None:
    assert relay_of(f"/ip4/198.18.0.2/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}") == RELAY
    assert relay_of(f"/p2p/{RELAY}/p2p-circuit/p2p/{PEER}") == RELAY
    assert relay_of("/ip4/198.18.0.2/tcp/4001") is None
    assert relay_of("/p2p-circuit") is None


def test_classify_direct_punched_relayed() -> None:
    direct = _Conn(["/ip4/198.18.0.102/tcp/4001"])
    assert classify(direct, False, ME) == Path("direct", None, "/ip4/198.18.0.102/tcp/4001")
    assert classify(direct, True, ME).kind == "hole-punched"
    relayed = _Conn([f"/p2p/{RELAY}/p2p-circuit/p2p/{PEER}"])
    assert classify(relayed, True, ME) == Path("relayed", RELAY, f"/p2p/{RELAY}/p2p-circuit/p2p/{PEER}")


def test_inbound_circuit_tagged_with_our_own_id_names_the_real_relay() -> None:
    # py-libp2p 0.8.1 puts our own ID where the relay's belongs on inbound circuits.
    muxed = _Secured(_Raw(_Stream(_Muxed(_Id(RELAY)))))
    inbound = _Conn([f"/p2p/{ME}/p2p-circuit/p2p/{PEER}"], muxed_conn=muxed)
    path = classify(inbound, False, ME)
    assert path.kind == "relayed" and path.relay == RELAY
    assert path.addr == f"/p2p/{RELAY}/p2p-circuit/p2p/{PEER}"


def test_best_prefers_a_direct_path() -> None:
    relayed, punched = Path("relayed", RELAY), Path("hole-punched")
    assert best([relayed, punched]) == punched
    assert best([relayed]) == relayed
    assert best([]) is None
