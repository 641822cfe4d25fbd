"""Packaging facts the code relies on."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_python_below_3_11_is_refused() -> None:
    # asyncio.wait_for raises the builtin TimeoutError only from 3.11 on; before, it raised
    # asyncio.TimeoutError, which the overlay's `except TimeoutError` (anti-entropy, serving)
    # would not catch, so those loops would die on the first timeout.
    spec = SpecifierSet(tomllib.loads(PYPROJECT.read_text())["project"]["requires-python"])
    assert "3.10.14" not in spec
    assert "3.11.0" in spec


def test_ruff_targets_the_oldest_supported_python() -> None:
    config = tomllib.loads(PYPROJECT.read_text())
    assert config["tool"]["ruff"]["target-version"] == "py311"
