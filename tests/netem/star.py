"""A star of emulated links for tensor-parallel benches: worker namespaces, each with its own link
to the master in the root namespace, and a delay and rate on every link.

The master is at 10.77.0.1; worker rank ``r`` runs in namespace ``ptp<pid>-w<r>`` at 10.77.0.<r+1>.
:meth:`StarNet.set_link` delays each direction of every link by RTT/2 and serializes it at the
link's rate, so a master-worker ping sees the RTT. Two emulators (:func:`star_net`):

* :class:`NetemNet`: a bridge ``ptp<pid>br`` holds the master's address, a veth pair per worker is a
  port of it, and ``tc qdisc netem delay RTT/2 rate R`` sits on *both* ends of every veth.
* :class:`TunNet`: for kernels built without ``sch_netem``. A TUN device pair per worker
  (``ptp<pid>t<r>`` in the root namespace, ``eth0`` in the worker's) and a delay line
  (:func:`delay_line`), a child process at real-time priority (``SCHED_FIFO``, 1 ns timer slack),
  that moves each IP packet from one device to the other when its last byte has been serialized at
  the rate and RTT/2 has passed (netem's ``delay`` + ``rate``). The MTU is 64 KiB, so an all-reduce
  message is one packet, as veth's GSO would pass it.

A crashed run's namespaces and interfaces are removed at the next start (:func:`cleanup_stale`).
Needs root and ``ip``, ``tc``, ``ping``. Used by ``bench/tp_netem.py``.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import itertools
import math
import os
import re
import select
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from potluck.sharding.format.cost import LinkCost
from tests.netem.netns import (
    Namespace,
    NetemError,
    delete_namespace,
    in_namespace,
    list_namespaces,
    process_alive,
    sh,
)

REPO = Path(__file__).resolve().parents[2]
#: The star's addresses, in the root namespace (tests/netem's 198.18.0.0/24 and 10.<n>.0.0/24
#: for its first few homes exist only inside its own namespaces).
SUBNET = "10.77.0"
MASTER_IP = f"{SUBNET}.1"
TAG = "ptp"  # every name of a star: ptp<pid>br, ptp<pid>v<rank>, ptp<pid>t<rank>, ptp<pid>-w<rank>
_OWNED = re.compile(rf"^{TAG}(\d+)(br|[vt]\d+|-w\d+)$")
PINGS = 20
TUN_MTU = 65535
_TUNSETIFF, _IFF_TUN, _IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
_PR_SET_TIMERSLACK = 29


def _owner(name: str) -> int | None:
    """Process id of the run that created ``name``; ``None`` if the name is not a star's."""
    m = _OWNED.match(name)
    return int(m[1]) if m else None


def _root_links() -> list[str]:
    """Interface names in the root namespace (without the ``@peer`` suffix)."""
    out = sh("ip", "-o", "link", "show").stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def cleanup_stale() -> list[str]:
    """Delete the namespaces and root interfaces of stars whose run is gone; return their names."""
    removed = []
    for name in list_namespaces():
        if (pid := _owner(name)) is not None and not process_alive(pid):
            delete_namespace(name)  # its veth pair goes with it
            removed.append(name)
    for name in _root_links():
        if (pid := _owner(name)) is not None and not process_alive(pid):
            sh("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


def netem_available() -> bool:
    """Whether the kernel has ``sch_netem`` (tried on a veth pair in a scratch namespace)."""
    ns = Namespace(f"{TAG}{os.getpid()}-w0", "")
    sh("ip", "netns", "add", ns.name)
    try:
        ns.run("ip", "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
        probe = ns.run("tc", "qdisc", "add", "dev", "probe0", "root", "netem", "delay", "1ms", check=False)
        return probe.returncode == 0
    finally:
        delete_namespace(ns.name)


def ping_s(prefix: Sequence[str], target: str, count: int = PINGS) -> float:
    """Median RTT of ``count`` pings of ``target`` (run under argv ``prefix``), seconds.

    Raises:
        NetemError: ping failed or printed no round trips.
    """
    out = sh(*prefix, "ping", "-n", "-c", str(count), "-i", "0.05", "-W", "2", target).stdout
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    if not times:
        raise NetemError(f"ping {target} printed no round trips:\n{out}")
    return statistics.median(times) / 1e3


class StarNet:
    """The worker namespaces and their links to the master (a context manager; module docstring).

    Subclasses build one link (:meth:`_attach`) and set the delay and rate (:meth:`set_link`).

    Args:
        workers: worker namespaces to create (ranks 1..workers).

    Raises:
        NetemError: a command failed, or another live run of this bench owns the subnet (on entry).
    """

    def __init__(self, workers: int) -> None:
        self.tag = f"{TAG}{os.getpid()}"
        self.spaces = {r: Namespace(f"{self.tag}-w{r}", f"{SUBNET}.{r + 1}") for r in range(1, workers + 1)}
        self._made: list[str] = []

    def __enter__(self) -> StarNet:
        cleanup_stale()
        names = _root_links() + list_namespaces()
        others = [n for n in names if (pid := _owner(n)) not in (None, os.getpid()) and process_alive(pid)]
        if others:
            raise NetemError(f"another star owns {SUBNET}.0/24 ({others[0]})")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _build(self) -> None:
        for rank, ns in self.spaces.items():
            sh("ip", "netns", "add", ns.name)
            self._made.append(ns.name)
            ns.run("ip", "link", "set", "lo", "up")
            self._attach(rank, ns)

    def _attach(self, rank: int, ns: Namespace) -> None:
        raise NotImplementedError

    def set_link(self, link: LinkCost | None) -> None:
        """Delay each direction by ``link.rtt_s / 2`` at ``link.bandwidth``; ``None``: neither."""
        raise NotImplementedError

    def close(self) -> None:
        """Kill what runs in the namespaces and delete them (idempotent)."""
        for name in reversed(self._made):
            delete_namespace(name)
        self._made.clear()

    def cpu_s(self) -> float:
        """CPU seconds the emulator has used so far (0: it runs in the kernel, not attributed)."""
        return 0.0

    def prefix(self, rank: int) -> list[str]:
        """argv prefix that runs worker ``rank`` in its namespace (``ProcessGroup(worker_prefix=...)``)."""
        return self.spaces[rank].argv([])

    def rtt_s(self, ranks: Sequence[int], count: int = PINGS) -> float:
        """The slowest of ``ranks``' median ping RTT to the master, seconds.

        Raises:
            NetemError: ping failed or printed no round trips.
        """
        return max(ping_s(self.spaces[rank].argv([]), MASTER_IP, count) for rank in ranks)


class NetemNet(StarNet):
    """A bridge with the master's address, a veth pair per worker, netem on both ends."""

    def _build(self) -> None:
        self.bridge = f"{self.tag}br"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{MASTER_IP}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        super()._build()

    def _attach(self, rank: int, ns: Namespace) -> None:
        port = f"{self.tag}v{rank}"
        sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        sh("ip", "link", "set", port, "master", self.bridge, "up")
        ns.run("ip", "addr", "add", f"{ns.ip}/24", "dev", "eth0")
        ns.run("ip", "link", "set", "eth0", "up")

    def set_link(self, link: LinkCost | None) -> None:
        for rank, ns in self.spaces.items():
            for run, dev in ((sh, f"{self.tag}v{rank}"), (ns.run, "eth0")):
                if link is None:
                    run("tc", "qdisc", "del", "dev", dev, "root", check=False)
                else:
                    run("tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{link.rtt_s * 1e3 / 2:g}ms",
                        "rate", f"{link.bandwidth * 8 / 1e3:.0f}kbit")  # fmt: skip

    def close(self) -> None:
        super().close()
        sh("ip", "link", "del", f"{self.tag}br", check=False)


def _open_tun(name: str) -> int:
    """A file descriptor of a new TUN device ``name`` (IP packets, no packet-info header)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


class TunNet(StarNet):
    """A TUN device pair per worker joined by the delay line (:func:`delay_line`, a child process)."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._fds: list[int] = []  # master side, worker side, per worker
        self._line: subprocess.Popen[str] | None = None

    def _attach(self, rank: int, ns: Namespace) -> None:
        outer = f"{self.tag}t{rank}"
        self._fds += [_open_tun(outer), in_namespace(ns.name, lambda: _open_tun("eth0"))]
        for run, dev, ip, peer in ((sh, outer, MASTER_IP, ns.ip), (ns.run, "eth0", ns.ip, MASTER_IP)):
            run("ip", "link", "set", dev, "mtu", str(TUN_MTU), "up")
            run("ip", "addr", "add", ip, "peer", peer, "dev", dev)

    def _build(self) -> None:
        super()._build()
        argv = [sys.executable, "-m", "tests.netem.star", "--delay-line", ",".join(map(str, self._fds))]
        pipe = subprocess.PIPE
        self._line = subprocess.Popen(argv, pass_fds=self._fds, stdin=pipe, stdout=pipe, text=True, cwd=REPO)
        self._command("0 inf")

    def _command(self, line: str) -> None:
        assert self._line is not None and self._line.stdin is not None and self._line.stdout is not None
        self._line.stdin.write(line + "\n")
        self._line.stdin.flush()
        if self._line.stdout.readline().strip() != "ok":
            raise NetemError(f"the delay line did not take {line!r} (exit code {self._line.poll()})")

    def set_link(self, link: LinkCost | None) -> None:
        self._command(f"{link.rtt_s / 2!r} {link.bandwidth!r}" if link else "0 inf")

    def cpu_s(self) -> float:
        assert self._line is not None
        fields = Path(f"/proc/{self._line.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def close(self) -> None:
        if self._line is not None:
            try:
                self._line.communicate(timeout=5)  # EOF on its stdin: it exits
            except subprocess.TimeoutExpired:
                self._line.kill()
                self._line.wait()
            self._line = None
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        super().close()


def delay_line(fds: Sequence[int]) -> int:
    """Move packets between TUN devices ``fds[2i]`` and ``fds[2i + 1]`` with a delay and a rate.

    Settings arrive on stdin as lines ``"<one-way delay s> <bytes/s>"``, each answered ``ok``; EOF
    ends it. A packet read at ``t`` starts serializing when its direction's wire is free, occupies
    it ``len / rate`` and is written to the other device ``delay`` after that (netem's ``delay`` with
    ``rate``). Timers use ``select`` (microseconds; epoll rounds to milliseconds).
    """
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except PermissionError:
        pass  # still correct, only less punctual on a busy machine
    pairs = list(zip(fds[::2], fds[1::2], strict=True))
    peer = {**dict(pairs), **{b: a for a, b in pairs}}
    for fd in peer:
        os.set_blocking(fd, False)
    free = dict.fromkeys(peer, 0.0)  # per direction: when its wire is next idle (monotonic s)
    delay, rate = 0.0, math.inf
    due: list[tuple[float, int, int, bytes]] = []  # (deliver at, seq, to fd, packet)
    seq = itertools.count()
    readers = [0, *peer]
    while True:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
        ready, _, _ = select.select(readers, [], [], timeout)
        now = time.monotonic()
        for fd in ready:
            if fd == 0:
                line = os.read(0, 4096).decode()
                if not line:
                    return 0
                delay, rate = (float(x) for x in line.split())
                print("ok", flush=True)
                continue
            while True:
                try:
                    pkt = os.read(fd, TUN_MTU)
                except BlockingIOError:
                    break
                free[fd] = max(now, free[fd]) + len(pkt) / rate
                heapq.heappush(due, (free[fd] + delay, next(seq), peer[fd], pkt))
        now = time.monotonic()
        while due and due[0][0] <= now:
            os.write(due[0][2], heapq.heappop(due)[3])


def star_net(workers: int, kind: str = "auto") -> StarNet:
    """A (not yet built) star of ``workers`` links: ``kind`` netem, tun, or auto (netem where the
    kernel has it)."""
    if kind == "auto":
        kind = "netem" if netem_available() else "tun"
    return NetemNet(workers) if kind == "netem" else TunNet(workers)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.netem.star --delay-line FDS``: the tun emulator's child process."""
    ap = argparse.ArgumentParser(prog="tests.netem.star")
    ap.add_argument("--delay-line", required=True, help="comma-separated TUN file descriptors, in pairs")
    args = ap.parse_args(argv)
    return delay_line([int(x) for x in args.delay_line.split(",")])


if __name__ == "__main__":
    sys.exit(main())
