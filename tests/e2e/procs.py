"""Helpers to run real ``potluck`` processes in end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.helpers import until

POTLUCK = [sys.executable, "-m", "potluck.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for a node process: isolated dirs, no network to Hugging Face."""
    env = dict(os.environ)
    env.update(
        {
            "POTLUCK_DATA_DIR": str(home / "data"),
            "POTLUCK_CACHE_DIR": str(home / "cache"),
            "XDG_CONFIG_HOME": str(home / "config"),
            "HF_HUB_OFFLINE": "1",
            "COLUMNS": "200",
            # Overlay: loopback only, a free port, no zeroconf on the host's real LAN (tests that
            # want them override these through ``extra``).
            "POTLUCK_P2P_HOST": "127.0.0.1",
            "POTLUCK_P2P_PORT": "0",
            "POTLUCK_LAN_DISCOVERY": "false",
        }
    )
    env.update(extra)
    return env


def get_json(url: str, timeout: float = 10.0) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def post_json(url: str, body: dict[str, Any], timeout: float = 180.0) -> Any:
    """POST ``body`` as JSON to ``url`` and decode the JSON reply."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def sse_events(url: str, body: dict[str, Any], timeout: float = 180.0) -> Iterator[dict[str, Any]]:
    """POST ``body`` to ``url`` and yield each server-sent event's JSON (``[DONE]`` ends it)."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                return
            if line.startswith("data: "):
                yield json.loads(line[6:])


def swarm_env(home: Path, swarm: str, secret: str, rate_tps: str, **extra: str) -> dict[str, str]:
    """A node in a private loopback swarm with fast state rounds and a capped serving rate."""
    return offline_env(
        home,
        POTLUCK_SWARM=swarm,
        POTLUCK_SWARM_SECRET=secret,
        POTLUCK_STATE_INTERVAL_S="1",
        POTLUCK_STATE_TTL_S="8",
        POTLUCK_SERVE_RATE_LIMIT_TPS=rate_tps,
        POTLUCK_N_THREADS="1",
        **extra,
    )


class NodeExited(RuntimeError):
    """The node process exited while a test waited for it."""


class LoggedProcess:
    """A child process whose stdout+stderr go to ``self.log``; subclasses set ``proc``, ``log``, ``_fh``."""

    proc: subprocess.Popen[bytes]
    log: Path
    _fh: Any

    def output(self) -> str:
        if not self._fh.closed:
            self._fh.flush()
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        """Signal the process, kill it past ``timeout`` s; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()
        return self.proc.returncode


class NodeProcess(LoggedProcess):
    """A ``potluck node start`` subprocess; stdout+stderr go to ``log``."""

    def __init__(self, home: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None):
        home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "node.log"
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [*POTLUCK, "node", "start", "--port", str(self.port), *args],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=env or offline_env(home),
        )

    def wait_ready(self, timeout: float = 120.0) -> dict:
        def ready() -> dict | None:
            if self.proc.poll() is not None:
                raise NodeExited(f"node exited with {self.proc.returncode}:\n{self.output()}")
            health = get_json(self.url + "/healthz", timeout=2)
            return health if health["status"] == "ok" else None

        try:  # not yet listening: OSError
            return until(ready, timeout, "the node to be ready", interval=0.2, retry_on=(OSError,))
        except AssertionError as exc:  # timed out
            raise AssertionError(f"{exc}:\n{self.output()}") from None

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGKILL if exc[0] else signal.SIGINT)


@contextmanager
def recording_proxy(upstream_url: str, record: Path, log_path: Path) -> Iterator[str]:
    """Run :mod:`tests.e2e.recording_proxy` in front of ``upstream_url`` (the "cloud" stand-in).

    Every request body it forwards is appended to ``record`` (JSON lines). Yields the proxy's base
    URL once its ``/healthz`` answers; the process is terminated on exit.
    """
    port = free_port()
    with log_path.open("wb") as log:
        proxy = subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.e2e.recording_proxy", "--port", str(port)),
                *("--upstream", upstream_url, "--record", str(record)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
        try:
            url = f"http://127.0.0.1:{port}"

            def up() -> bool:
                assert proxy.poll() is None, "the recording proxy exited"
                with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                    return resp.status == 200

            until(up, 30, "the recording proxy", retry_on=(OSError,))
            yield url
        finally:
            proxy.terminate()
            proxy.wait(10)
