"""An in-memory byte stream for overlay tests (the libp2p stream seam without a network)."""

from __future__ import annotations


class MemoryStream:
    """Reads fixed input at most ``chunk`` bytes at a time; collects what is written in ``out``."""

    def __init__(self, data: bytes, chunk: int = 7) -> None:
        self._in = bytearray(data)
        self._chunk = chunk
        self.out = bytearray()

    async def read(self, n: int | None = None) -> bytes:
        take = min(self._chunk, len(self._in), n or len(self._in))
        piece = bytes(self._in[:take])
        del self._in[:take]
        return piece

    async def write(self, data: bytes) -> None:
        self.out += data

    async def close(self) -> None:
        """Nothing to release."""
