"""How a connection to a peer runs: ``direct``, ``hole-punched`` or ``relayed`` (through which relay).

py-libp2p tags each swarm connection with its transport addresses; a relayed one carries
``/p2p/<relay>/p2p-circuit/p2p/<peer>`` (circuit relay v2). A direct connection to a peer that this
node had reached through a relay before is one DCUtR opened (hole punching, libp2p DCUtR spec):
neither side of a NAT can be dialled directly otherwise, and potluck dials direct addresses first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from potluck.identity import PeerId

PathKind = Literal["direct", "hole-punched", "relayed"]
_RANK: dict[str, int] = {"direct": 0, "hole-punched": 0, "relayed": 1}


@dataclass(frozen=True)
class Path:
    """One live connection to a peer, as JSON-ready data via :meth:`as_dict`."""

    kind: PathKind
    relay: PeerId | None = None  # the relay's peer ID when ``kind == "relayed"``
    addr: str | None = None  # remote transport address (direct) or the circuit address (relayed)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "relay": self.relay, "addr": self.addr}


def relay_of(addr: str) -> PeerId | None:
    """The relay peer ID in a circuit address ``.../p2p/<relay>/p2p-circuit/...``, else ``None``."""
    if "/p2p-circuit" not in addr:
        return None
    head = addr.split("/p2p-circuit", 1)[0]
    if "/p2p/" not in head:
        return None
    return PeerId(head.rsplit("/p2p/", 1)[1].split("/", 1)[0])


def _relay_stream_peer(conn: Any, depth: int = 6) -> PeerId | None:
    """The peer at the far end of the relay stream a circuit runs over (the relay itself)."""
    obj = conn
    for _ in range(depth):
        stream = getattr(obj, "stream", None)
        peer = getattr(getattr(stream, "muxed_conn", None), "peer_id", None)
        if peer is not None:
            return PeerId(peer.to_base58())
        obj = next(
            (
                getattr(obj, a)
                for a in ("muxed_conn", "secured_conn", "conn", "raw_conn", "_wrapped")
                if hasattr(obj, a)
            ),
            None,
        )
        if obj is None:
            return None
    return None


def classify(conn: Any, punched: bool, me: str = "") -> Path:
    """The :class:`Path` of one py-libp2p swarm connection.

    Args:
        conn: an ``INetConn`` (``get_transport_addresses()``).
        punched: the peer was reached through a relay before this direct connection existed.
        me: our peer ID. py-libp2p 0.8.1 tags an *inbound* circuit with our own ID in the relay's
            place (``CircuitV2Protocol.handle_incoming_connection``); the relay is then read
            from the relay stream underneath.
    """
    try:
        addrs = [str(a) for a in conn.get_transport_addresses()]
    except (AttributeError, RuntimeError, ValueError):
        addrs = []
    for addr in addrs:
        relay = relay_of(addr)
        if relay is not None:
            if relay == me:
                relay = _relay_stream_peer(conn) or relay
                addr = f"/p2p/{relay}/p2p-circuit" + addr.split("/p2p-circuit", 1)[1]
            return Path("relayed", relay, addr)
    return Path("hole-punched" if punched else "direct", None, addrs[0] if addrs else None)


def best(paths: Iterable[Path]) -> Path | None:
    """The path new streams take: a direct (or hole-punched) one before a relayed one."""
    ordered = sorted(paths, key=lambda p: _RANK[p.kind])
    return ordered[0] if ordered else None
