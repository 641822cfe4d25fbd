"""One sanitizer per test session: building it loads presidio and the word lists (about a second)."""

from __future__ import annotations

import pytest

from potluck.privacy.sanitizer import Sanitizer


@pytest.fixture(scope="session")
def sanitizer() -> Sanitizer:
    return Sanitizer()
