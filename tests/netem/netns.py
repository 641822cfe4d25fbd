"""Network namespaces: create, delete, run commands and open sockets inside them.

A :class:`Namespace` is one ``ip netns`` namespace. Commands run in it through
``ip netns exec NAME ...``; sockets are created in it directly (``setns(2)`` in a short-lived
helper thread, see :meth:`Namespace.socket`), so a test can talk to a process inside a namespace
without any interface in the caller's own namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tests.helpers import until

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetemError(RuntimeError):
    """A namespace, link or NAT could not be set up (the failing command and its stderr)."""


def missing_requirements() -> str | None:
    """Why the emulated internet cannot run here, or ``None`` when it can.

    Returns:
        a skip reason naming what is missing (root, ``ip``, ``iptables``), or ``None``.
    """
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install {'iproute2' if tool == 'ip' else 'iptables'})"
    return None


def sh(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run one command (no shell); raise :class:`NetemError` with its stderr when it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetemError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    """PIDs of the processes whose network namespace is ``name``."""
    proc = sh("ip", "netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def delete_namespace(name: str, kill_timeout: float = 5.0) -> None:
    """Kill every process inside namespace ``name`` (SIGKILL, by PID) and delete it.

    Interfaces living in the namespace (veth ends, bridges) disappear with it; the other end of a
    veth pair is removed by the kernel as well.
    """
    pids = namespace_pids(name)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    with contextlib.suppress(AssertionError):  # best effort: the namespace goes either way
        until(
            lambda: not any(process_alive(p) for p in pids),
            kill_timeout,
            f"the processes in {name} to die",
            interval=0.05,
        )
    sh("ip", "netns", "del", name, check=False)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone when /proc says so.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def in_namespace(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a helper thread that has joined namespace ``name`` (``setns(2)``).

    ``setns`` changes the namespace of the calling thread only, so the caller's thread stays where
    it is; sockets ``fn`` creates belong to ``name`` for their whole life.

    Raises:
        NetemError: the namespace does not exist or ``setns`` failed; whatever ``fn`` raised.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
        except OSError as exc:
            box["exc"] = NetemError(f"namespace {name} not found: {exc}")
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                box["exc"] = NetemError(f"setns({name}) failed: {os.strerror(err)}")
                return
        finally:
            os.close(fd)
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed over to the calling thread, re-raised there
            box["exc"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if "exc" in box:
        raise box["exc"]
    return box["value"]  # type: ignore[no-any-return]


class Namespace:
    """One network namespace (created by :class:`~tests.netem.internet.Internet`).

    Args:
        name: the ``ip netns`` name.
        ip: its main IPv4 address (on the public segment or its home LAN).
    """

    def __init__(self, name: str, ip: str) -> None:
        self.name = name
        self.ip = ip

    def __repr__(self) -> str:
        return f"Namespace({self.name!r}, ip={self.ip!r})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it.

        Raises:
            NetemError: it exited non-zero and ``check`` is set.
        """
        return sh(*self.argv(argv), check=check, timeout=timeout)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside the namespace (``subprocess.Popen`` keyword arguments)."""
        return subprocess.Popen(self.argv(argv), **kwargs)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket that lives in this namespace (bind/connect/listen act there)."""
        return in_namespace(self.name, lambda: socket.socket(family, type))

    def connect(self, addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
        """A TCP connection from inside this namespace to ``addr`` (``(ip, port)``).

        Raises:
            OSError: the connection failed or timed out.
        """
        sock = self.socket()
        sock.settimeout(timeout)
        try:
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock
