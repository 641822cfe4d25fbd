"""A bare libp2p endpoint for tools and tests: a :class:`Libp2pHost` in its trio thread, without a node.

:class:`StandaloneHost` runs a private asyncio loop in a background thread that owns the
:class:`~potluck.overlay.bridge.TrioThread` (the bridge's lifecycle is an asyncio context manager),
so plain synchronous code (a benchmark process, a test) can dial peers, open streams and drive
:class:`~potluck.overlay.tp_stream.Libp2pByteStream` through :meth:`TrioThread.run_blocking`.
No admission, state or RPC runs here: it is the transport alone (TCP + Noise + Yamux).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from potluck.errors import ConnectError
from potluck.identity import PeerId, load_or_create_identity
from potluck.overlay.bridge import TrioThread
from potluck.overlay.host import Libp2pHost, listen_multiaddr

_START_TIMEOUT_S = 30.0


class StandaloneHost:
    """Start with :meth:`start` (blocking), stop with :meth:`stop`; or use as a context manager.

    Args:
        data_dir: where the host's Ed25519 key lives (created if missing).
        ip: address to listen on (TCP, a free port).
    """

    def __init__(self, data_dir: Path, ip: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir)
        self.ip = ip
        self.host: Libp2pHost | None = None
        self.bridge: TrioThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> StandaloneHost:
        """Start the loop thread, the trio thread and the host; returns once it listens.

        Raises:
            ConnectError: the host did not come up within 30 s (or failed).
        """
        self._thread = threading.Thread(target=self._run, name="potluck-endpoint", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S) or self._error is not None:
            raise ConnectError(f"libp2p endpoint did not start: {self._error!r}")
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start() or logged by the caller
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        identity = load_or_create_identity(self.data_dir)
        host = Libp2pHost(identity, [listen_multiaddr(self.ip, 0)])

        async def trio_main(ready: Callable[[], None]) -> None:
            async with host.running():
                self.host = host
                ready()
                await anyio.sleep_forever()

        async with TrioThread("potluck-endpoint-trio", trio_main) as bridge:
            self.bridge = bridge
            self._ready.set()
            await self._stop.wait()

    @property
    def peer_id(self) -> PeerId:
        assert self.host is not None
        return self.host.peer_id

    @property
    def addr(self) -> str:
        """The first listen multiaddr, with ``/p2p/<peer ID>``."""
        assert self.host is not None
        return self.host.addrs()[0]

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``await fn(*args)`` in the trio thread from this (plain) thread."""
        assert self.bridge is not None
        return self.bridge.run_blocking(fn, *args)

    def set_handler(self, protocol: str, handler: Callable[[Any, PeerId], Awaitable[None]]) -> None:
        """Serve ``protocol`` with ``handler(stream, peer)`` (runs in the trio thread)."""
        assert self.host is not None
        host = self.host

        async def install() -> None:
            host.set_handler(protocol, handler)

        self.run(install)

    def stop(self) -> None:
        """Stop the host and both threads; idempotent."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # the loop already ended
        if self._thread is not None:
            self._thread.join(_START_TIMEOUT_S)
            self._thread = None

    def __enter__(self) -> StandaloneHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
