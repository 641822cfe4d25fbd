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

from potluck.node.identity import PeerId

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


def classify(conn: Any, punched: bool) -> Path:
    """The :class:`Path` of one py-libp2p swarm connection.

    Args:
        conn: an ``INetConn`` (``get_transport_addresses()``).
        punched: the peer was reached through a relay before this direct connection existed.
    """
    try:
        addrs = [str(a) for a in conn.get_transport_addresses()]
    except (AttributeError, RuntimeError, ValueError):
        addrs = []
    for addr in addrs:
        relay = relay_of(addr)
        if relay is not None:
            return Path("relayed", relay, addr)
    return Path("hole-punched" if punched else "direct", None, addrs[0] if addrs else None)


def best(paths: Iterable[Path]) -> Path | None:
    """The path new streams take: a direct (or hole-punched) one before a relayed one."""
    ordered = sorted(paths, key=lambda p: _RANK[p.kind])
    return ordered[0] if ordered else None
