"""Model pulls started from the dashboard (``POST /api/models/pull``), with live progress.

A pull runs :func:`potluck.inference.resolve.download` (the same call as ``potluck models pull``) in
a worker thread. huggingface_hub draws its progress through the ``tqdm`` class it is given; ours
(:func:`progress_class`) draws nothing and hands the bar's numbers (bytes done, total, rate) to the
event loop, where they become the ``pulls`` section of the event stream, at most every
``REPORT_INTERVAL_S``. A failed pull (offline, unknown repo, not a GGUF) is reported with its
message; it never stops the node.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from potluck.errors import PotluckError, RequestError

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.25
MAX_PULLS_SHOWN = 8  # finished pulls kept in the view


class _NullFile:
    """Where the bar 'draws': nowhere."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


Report = Callable[[dict[str, Any]], None]


class PullCancelled(Exception):
    """Raised inside the download thread to abandon a pull whose task was cancelled (node shutdown)."""


def progress_class(report: Report, stop: threading.Event) -> type[tqdm]:
    """A ``tqdm`` subclass that calls ``report({"n", "total", "rate"})`` (from the download thread).

    Args:
        report: called with bytes done, total bytes (``None`` if unknown) and bytes/s.
        stop: once set, the next progress update raises :class:`PullCancelled`, which ends the
            download (so a shutting-down node does not wait for the download's worker thread).
    """

    class PullBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = _NullFile()
            kwargs.pop("name", None)
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)
            self._reported = 0.0
            self._send()

        def _send(self) -> None:
            rate = self.format_dict.get("rate")
            report({"n": int(self.n), "total": int(self.total) if self.total else None, "rate": rate or 0.0})

        def update(self, n: float | None = 1) -> bool | None:
            if stop.is_set():
                raise PullCancelled("the node is shutting down")
            out = super().update(n)
            now = time.monotonic()
            if now - self._reported >= REPORT_INTERVAL_S or (self.total and self.n >= self.total):
                self._reported = now
                self._send()
            return out

    return PullBar


class Pulls:
    """The dashboard's model pulls and their state (the ``pulls`` section).

    Args:
        cache_dir: where models are downloaded (the node's cache).
        changed: called on the event loop whenever a pull's state changed (publishes the section).
        activity: called with a line of text when a pull ends.
    """

    def __init__(self, cache_dir: Path, changed: Callable[[], None], activity: Callable[[str, str], Any]) -> None:
        self.cache_dir = cache_dir
        self._changed = changed
        self._activity = activity
        self._pulls: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def view(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(p) for p in self._pulls.values()]

    def begin(self, spec: str) -> str:
        """Register a pull of ``spec`` (``owner/repo:file.gguf``) and return its id.

        Raises:
            RequestError: ``spec`` is not a Hugging Face file, or it is already being pulled.
        """
        from potluck.inference.resolve import HubFile

        if HubFile.parse(spec) is None:
            raise RequestError(f"{spec!r} is not a Hugging Face file; use 'owner/repo:file.gguf'")
        with self._lock:
            if any(p["spec"] == spec and p["state"] == "running" for p in self._pulls.values()):
                raise RequestError(f"{spec} is already being pulled")
            pull_id = secrets.token_hex(6)
            self._pulls[pull_id] = {
                "id": pull_id,
                "spec": spec,
                "state": "running",
                "n": 0,
                "total": None,
                "rate": 0.0,
                "error": None,
                "path": None,
            }
            finished = [k for k, p in self._pulls.items() if p["state"] != "running"]
            for k in finished[: max(0, len(finished) - MAX_PULLS_SHOWN)]:
                del self._pulls[k]
        return pull_id

    async def run(self, pull_id: str) -> None:
        """Download the pull's file in a worker thread; its outcome goes into the view (never raised)."""
        from potluck.inference.resolve import download

        loop = asyncio.get_running_loop()
        spec = self._pulls[pull_id]["spec"]

        def report(progress: dict[str, Any]) -> None:
            with self._lock:
                self._pulls[pull_id].update(progress)
            loop.call_soon_threadsafe(self._changed)

        stop = threading.Event()
        try:
            path = await asyncio.to_thread(download, spec, self.cache_dir, progress_class(report, stop))
        except asyncio.CancelledError:
            stop.set()
            raise
        except PotluckError as exc:  # DownloadError, ModelFileError: shown on the page
            log.warning("pull of %s failed: %s", spec, exc)
            self._finish(pull_id, state="failed", error=str(exc))
            self._activity("pull", f"pull of {spec} failed: {exc}")
        else:
            self._finish(pull_id, state="done", path=str(path))
            self._activity("pull", f"pulled {spec}")
        self._changed()

    def _finish(self, pull_id: str, **fields: Any) -> None:
        with self._lock:
            self._pulls[pull_id].update(fields)
