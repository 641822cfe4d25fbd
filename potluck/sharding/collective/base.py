"""The collective-communication seam between the tensor-parallel engine and its data plane.

A :class:`Collective` is one member's blocking view of a *star* group (TPI-LLM, Li et al. 2024, §3.3
"star-based all-reduce"; distributed-llama's ``SYNC_NODE_SLICES`` pattern): rank 0 is the master and
ranks ``1..world_size-1`` are workers, each connected only to the master.

Implementations:

- :class:`~potluck.sharding.collective.star.StarMaster` / :class:`~.star.StarWorker`: direct TCP
  (TCP_NODELAY, binary frames from :mod:`potluck.sharding.collective.frames`, HMAC-SHA256 session-key auth).
- ``potluck.sharding.collective.in_process``: an in-process implementation for unit tests (owned by the engine).

Errors (see :mod:`potluck.errors`): the master raises :class:`~potluck.errors.PeerFailed` (with the
``rank`` of the member) from :meth:`Collective.broadcast` / :meth:`Collective.all_reduce` within
``timeout_s`` when a worker dies, stalls or sends a bad frame; a worker raises
:class:`~potluck.errors.TransferError` (or :class:`~potluck.errors.ClosedError` after its own
:meth:`Collective.close`) when the master goes away.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Collective"]


@runtime_checkable
class Collective(Protocol):
    """One member's blocking view of a star group. Rank 0 is the master; ranks 1..world_size-1 are workers.

    All calls block the calling thread (the engine runs in a worker thread) and honour the
    implementation's ``timeout_s`` deadline.
    """

    rank: int
    world_size: int

    def broadcast(self, header: dict[str, Any], array: np.ndarray | None = None) -> None:
        """Master only: send a control header plus an optional array to every worker.

        Args:
            header: msgpack-able dict: ``str`` keys; ``int``/``float``/``str``/``bool``/``list``/``bytes``/
                ``None`` values.
            array: optional C-contiguous float32 or float16 array of any shape.

        Raises:
            PeerFailed: a worker died or stalled past ``timeout_s`` (``rank`` says which).
            ProtocolViolation: the header or array cannot be framed (bad dtype, too large).
        """
        ...

    def receive(self) -> tuple[dict[str, Any], np.ndarray | None]:
        """Worker only: the next ``(header, array)`` the master broadcast.

        Raises:
            TransferError: the master went away or stalled past ``timeout_s``.
            ProtocolViolation: the master sent a malformed frame.
        """
        ...

    def all_reduce(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over all ranks of a same-shaped float32 array; every rank gets the sum.

        Star: workers send partial sums to the master, the master adds them in rank order 0, 1, 2, ...
        (deterministic) and sends the sum back: two network hops. The wire dtype is float32 by default;
        the ``wire_dtype`` constructor option may select float16.

        Args:
            array: float32 array, same shape on every rank.

        Returns:
            float32 array of the same shape: the sum over ranks.

        Raises:
            PeerFailed: (master) a worker died, stalled or sent a bad frame.
            TransferError: (worker) the master went away or stalled.
        """
        ...

    def gather(self, array: np.ndarray, shapes: Sequence[tuple[int, ...]] = ()) -> list[np.ndarray]:
        """Every rank's float32 array, collected at the master (one hop; the vocab-parallel head's
        logits slices, Megatron-LM's parallel output embedding, Shoeybi et al. 2019, §3).

        Args:
            array: this rank's float32 array (its shape may differ from the other ranks').
            shapes: master only: the shape expected from every rank, in rank order (``shapes[0]``
                is the master's own); a worker sending another shape has failed.

        Returns:
            master: ``[own, rank 1's, ..., rank N-1's]`` (fresh arrays); worker: ``[]``.

        Raises:
            PeerFailed: (master) a worker died, stalled or sent a wrong shape.
            TransferError: (worker) the master went away or stalled.
            ProtocolViolation: the array exceeds the frame limit.
        """
        ...

    def close(self) -> None:
        """Release the connections; idempotent. Later calls raise ClosedError."""
        ...
