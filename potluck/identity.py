"""Node identity and trust: an Ed25519 key pair, the libp2p peer ID derived from it, trust tiers.

The peer ID follows the libp2p peer-ID spec (https://github.com/libp2p/specs/blob/master/peer-ids/peer-ids.md):
the public key is serialized as the protobuf ``PublicKey{Type: Ed25519, Data: <32 bytes>}``,
which is short enough (36 bytes) to be wrapped in an *identity* multihash, and the result is
base58btc-encoded (the familiar ``12D3KooW...`` form).
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NewType

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from potluck.errors import ConfigError

log = logging.getLogger(__name__)

PeerId = NewType("PeerId", str)

KEY_FILE = "node_key.pem"
_PB_ED25519_PUBKEY_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])  # field1=KeyType.Ed25519, field2=len 32
_IDENTITY_MULTIHASH_PREFIX = bytes([0x00, 0x24])  # code 0x00 (identity), length 36


class Tier(enum.IntEnum):
    """Trust tier of a destination, most to least trusted (ARCHITECTURE.md, "Identity and trust").

    ``LOCAL`` this device; ``OWN`` my own devices (same swarm owner key or allowlist);
    ``COMMUNITY`` community peers; ``CLOUD`` a cloud LLM. Data leaves toward a higher tier only
    through the privacy policy (:mod:`potluck.privacy.policy`).
    """

    LOCAL = 0
    OWN = 1
    COMMUNITY = 2
    CLOUD = 3


def peer_id_from_public_key(public_key: Ed25519PublicKey) -> PeerId:
    """Derive the libp2p peer ID (base58btc string) of an Ed25519 public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PeerId(base58.b58encode(_IDENTITY_MULTIHASH_PREFIX + _PB_ED25519_PUBKEY_PREFIX + raw).decode())


def public_key_from_peer_id(peer_id: str) -> Ed25519PublicKey:
    """Recover the Ed25519 public key embedded in an identity-multihash peer ID.

    Raises:
        ValueError: the string is not an Ed25519 identity peer ID.
    """
    try:
        data = base58.b58decode(peer_id)
    except ValueError as exc:
        raise ValueError(f"not a base58 peer ID: {peer_id!r}") from exc
    prefix = _IDENTITY_MULTIHASH_PREFIX + _PB_ED25519_PUBKEY_PREFIX
    if len(data) != len(prefix) + 32 or not data.startswith(prefix):
        raise ValueError(f"not an Ed25519 identity peer ID: {peer_id!r}")
    return Ed25519PublicKey.from_public_bytes(data[len(prefix) :])


@dataclass(frozen=True)
class NodeIdentity:
    """The node's key pair and peer ID."""

    private_key: Ed25519PrivateKey
    peer_id: PeerId

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def private_bytes_raw(self) -> bytes:
        """The 32-byte Ed25519 seed (what libp2p key constructors take)."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over ``data``."""
        return self.private_key.sign(data)


def verify(peer_id: str, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` by ``peer_id``."""
    try:
        public_key_from_peer_id(peer_id).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_or_create_identity(data_dir: Path) -> NodeIdentity:
    """Load the node key from ``data_dir``, generating it (file mode 0600) on first start.

    Raises:
        ConfigError: the key file exists but is unreadable or not an Ed25519 PEM key.
    """
    path = data_dir / KEY_FILE
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read node key {path}: {exc}; move it away to make a new one") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"node key {path} is not an Ed25519 key")
        if path.stat().st_mode & 0o077:
            log.warning("node key %s is readable by others; fixing its mode to 0600", path)
            path.chmod(0o600)
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        log.info("generated a new node key at %s", path)
    return NodeIdentity(private_key=key, peer_id=peer_id_from_public_key(key.public_key()))
