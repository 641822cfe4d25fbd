"""The ready barrier shared by the master and the workers of a swarm group."""

from __future__ import annotations

import numpy as np
import pytest

from potluck.errors import PeerFailed, ProtocolViolation
from potluck.sharding.orchestration.readiness import ready_barrier


class FakeMember:
    """A star member whose all-reduce returns ``total`` (or raises ``error``) and records the
    vector it was given and the deadline it ran under."""

    def __init__(self, total: np.ndarray | None = None, error: Exception | None = None) -> None:
        self.timeout_s = 10.0
        self.total = total
        self.error = error
        self.sent: np.ndarray | None = None
        self.timeout_during = 0.0

    def all_reduce(self, array: np.ndarray) -> np.ndarray:
        self.sent = array.copy()
        self.timeout_during = self.timeout_s
        if self.error is not None:
            raise self.error
        assert self.total is not None
        return self.total


def test_each_rank_sends_its_one_hot_vector_under_the_join_deadline():
    member = FakeMember(np.ones(3, np.float32))
    ready_barrier(member, 2, 3, wait_s=120.0, then_s=5.0)
    assert member.sent is not None and member.sent.tolist() == [0.0, 0.0, 1.0]
    assert member.timeout_during == 120.0
    assert member.timeout_s == 5.0


def test_a_sum_that_is_not_all_ones_is_a_protocol_violation():
    with pytest.raises(ProtocolViolation, match="not all ones"):
        ready_barrier(FakeMember(np.array([1.0, 2.0], np.float32)), 0, 2, wait_s=1.0, then_s=1.0)


def test_a_failed_rank_is_reported_and_the_deadline_restored():
    member = FakeMember(error=PeerFailed("gone", 1))
    with pytest.raises(PeerFailed):
        ready_barrier(member, 0, 2, wait_s=60.0, then_s=3.0)
    assert member.timeout_s == 3.0
