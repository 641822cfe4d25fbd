"""Kademlia DHT (py-libp2p ``KadDHT``): provider records for models, signed peer records.

Keys of our namespace (libp2p record keys, https://github.com/libp2p/specs/blob/master/kad-dht/README.md):

* ``/potluck/model/<model-id>`` - *provider* records: "this peer serves that model". The DHT key
  is the SHA-256 multihash of that string, so the model name does not skew the key space.
* ``/potluck/peer/<peer ID>`` - *value* records holding that peer's signed state record, so a WAN
  peer can look another one up by ID before any gossip reaches it.

:class:`PotluckValidator` guards the ``potluck`` namespace: a value must be a signed record of
exactly the peer its key names, unexpired, within size; among several, the highest sequence wins.
Nothing else may be stored under ``/potluck/``. Runs in the trio thread.
"""

from __future__ import annotations

import hashlib
import logging
import time

from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.records.utils import InvalidRecordType
from libp2p.records.validator import Validator

from potluck.overlay.host import Libp2pHost
from potluck.overlay.state import RecordRejected, parse_record

log = logging.getLogger(__name__)

NAMESPACE = "potluck"


def model_key(model_id: str) -> str:
    """The provider key of a model, as the hex SHA-256 multihash py-libp2p's ``provide`` accepts."""
    digest = hashlib.sha256(f"/potluck/model/{model_id}".encode()).digest()
    return (bytes([0x12, 0x20]) + digest).hex()


def peer_key(peer_id: str) -> str:
    return f"/{NAMESPACE}/peer/{peer_id}"


class PotluckValidator(Validator):
    """Validator of the ``/potluck/`` namespace (see the module docstring).

    Args:
        swarm: records of other swarms are invalid.
    """

    def __init__(self, swarm: str) -> None:
        self.swarm = swarm

    def validate(self, key: str, value: bytes) -> None:
        parts = key.split("/")
        if len(parts) != 4 or parts[0] != "" or parts[1] != NAMESPACE or parts[2] != "peer":
            raise InvalidRecordType(f"only /{NAMESPACE}/peer/<peer ID> values may be stored, not {key!r}")
        try:
            signed = parse_record(value, self.swarm, time.time())
        except RecordRejected as exc:
            raise InvalidRecordType(f"invalid potluck record under {key}: {exc}") from exc
        if signed.record.peer_id != parts[3]:
            raise InvalidRecordType(f"record of {signed.record.peer_id} stored under {key}")

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        for i, value in enumerate(values):
            try:
                seq = parse_record(value, self.swarm, time.time()).record.seq
            except RecordRejected:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best


def make_dht(p2p: Libp2pHost, swarm: str = "default") -> KadDHT:
    """A server-mode DHT on ``p2p`` with our namespace validator registered (not yet running)."""
    dht = KadDHT(p2p.host, DHTMode.SERVER, enable_random_walk=False)
    dht.register_validator(NAMESPACE, PotluckValidator(swarm))
    return dht
