"""Shared fixtures: paths to ../shared (fixture models, data) beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = SHARED / "models"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (CI clones main with shared/ beside it)."""
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: tests need ../shared beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def model_path(shared_dir: Path):
    """Factory: ``model_path("q8_0")`` -> Path of ``tinyshakespeare-q8_0.gguf``."""

    def get(kind: str = "q8_0") -> Path:
        path = shared_dir / "models" / f"tinyshakespeare-{kind}.gguf"
        assert path.is_file(), f"fixture model {path} is missing"
        return path

    return get


@pytest.fixture
def hub_offline(monkeypatch):
    """Hugging Face Hub offline for this test: the environment variable (for subprocesses and a
    first import) and huggingface_hub's constant, which it reads once at import (an earlier test
    may have imported it; the network call would then retry with backoff instead of failing)."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
