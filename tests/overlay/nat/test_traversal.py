"""When a relayed-only peer gets another round of hole-punch attempts after failed ones."""

from __future__ import annotations

from potluck.overlay.nat.traversal import PUNCH_COOLDOWN_MAX_S, PUNCH_COOLDOWN_S, punch_due


def test_a_failed_round_is_retried_after_a_cooldown_that_doubles_up_to_a_cap() -> None:
    assert punch_due(None, 0.0)  # never tried
    assert not punch_due((1, 100.0), 100.0 + PUNCH_COOLDOWN_S - 1)
    assert punch_due((1, 100.0), 100.0 + PUNCH_COOLDOWN_S)
    assert not punch_due((2, 100.0), 100.0 + 2 * PUNCH_COOLDOWN_S - 1)
    assert punch_due((2, 100.0), 100.0 + 2 * PUNCH_COOLDOWN_S)
    assert not punch_due((30, 100.0), 100.0 + PUNCH_COOLDOWN_MAX_S - 1)  # 2**29 x 30 s, capped
    assert punch_due((30, 100.0), 100.0 + PUNCH_COOLDOWN_MAX_S)
