"""Fixtures for overlay tests: node identities and overlay settings on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from potluck.config import Settings
from potluck.identity import NodeIdentity, peer_id_from_public_key


def make_identity() -> NodeIdentity:
    key = Ed25519PrivateKey.generate()
    return NodeIdentity(key, peer_id_from_public_key(key.public_key()))


@pytest.fixture
def identity_factory():
    return make_identity


@pytest.fixture
def overlay_settings(tmp_path: Path):
    """Factory of loopback overlay settings (no zeroconf, free port, fast heartbeats)."""
    counter = iter(range(1000))

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "data_dir": tmp_path / f"node{next(counter)}",
            "p2p_host": "127.0.0.1",
            "p2p_port": 0,
            "lan_discovery": False,
            "swarm": "test",
            "state_interval_s": 0.5,
            "anti_entropy_interval_s": 2.0,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make
