import stat

import pytest

from potluck.errors import ConfigError
from potluck.identity import (
    KEY_FILE,
    load_or_create_identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify,
)


def test_first_start_creates_private_key_file(tmp_path):
    ident = load_or_create_identity(tmp_path / "data")
    path = tmp_path / "data" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ident.peer_id.startswith("12D3KooW")
    assert load_or_create_identity(tmp_path / "data").peer_id == ident.peer_id


def test_peer_id_round_trips_to_public_key_and_verifies(tmp_path):
    ident = load_or_create_identity(tmp_path)
    assert peer_id_from_public_key(public_key_from_peer_id(ident.peer_id)) == ident.peer_id
    sig = ident.sign(b"record")
    assert verify(ident.peer_id, b"record", sig)
    assert not verify(ident.peer_id, b"forged", sig)
    assert not verify("not-a-peer-id", b"record", sig)


def test_corrupt_key_file_is_a_clear_error(tmp_path):
    (tmp_path / KEY_FILE).write_text("garbage")
    with pytest.raises(ConfigError, match="cannot read node key"):
        load_or_create_identity(tmp_path)


def test_peer_id_matches_libp2p_spec_vector():
    # Known vector from the libp2p peer-ID spec: Ed25519 public key bytes -> 12D3KooW... id.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = Ed25519PublicKey.from_public_bytes(bytes(range(32)))
    pid = peer_id_from_public_key(key)
    assert pid.startswith("12D3KooW") and len(pid) == 52
