"""A relay sees only ciphertext: packets captured in the relay's namespace during a relayed chat.

Both homes sit behind symmetric NATs, so A reaches B only through a relay (circuit relay v2) and
the connection stays there (asserted before and after the chat). While A asks B's model, a raw
``AF_PACKET`` socket opened inside each relay's namespace (``setns``, :meth:`Namespace.socket`)
records every frame on its ``eth0``. The test then asserts that

* the chat really crossed the capturing relay: TCP payload both between the relay and A's router
  and between the relay and B's router, at least as long as the prompt marker / completion;
* the capture lost nothing (``PACKET_STATISTICS``: no drops);
* neither the marker phrase in the prompt (lowercase common words the privacy guard leaves alone,
  so it really is sent to B) nor the completion text appear in any captured byte;
* positive control: a plain TCP connection from A's LAN to the relay's libp2p port that speaks
  multistream-select (``/multistream/1.0.0``, ``/noise``) and then sends the marker in the clear
  is captured, and the marker and the relay's plaintext protocol answers are found in it - the
  capture and the search would see the marker if it crossed the relay unencrypted.

What a wire capture at the relay cannot tell apart: the hop connections (A-relay, relay-B) are
Noise-encrypted themselves, so the marker would not be on the wire even if the two peers did not
run their own Noise session inside the circuit. This test shows that nothing readable leaves the
relay's interface; the end-to-end session itself is py-libp2p's circuit upgrade (see
``potluck/overlay/nat/relay.py``).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.natnet import P2P_PORT, SETTLING, NatNode, Swarm, nat_swarm
from tests.helpers import until
from tests.netem import Namespace, NatType, missing_requirements
from tests.netem.netns import in_namespace

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.netns,
    pytest.mark.timeout(420),
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

MODEL = "tinyshakespeare-q8_0"
# Lowercase common words: `potluck privacy redact` leaves them as they are (only "ROMEO" becomes a
# <NAME_n> placeholder), so the marker is part of what A sends to B through the relay.
MARKER = "purple walrus lantern meadow"
PROMPT = f"ROMEO: {MARKER}"
MAX_TOKENS = 24

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_STATISTICS = 6
CAPTURE_CAP_BYTES = 64 * 1024 * 1024  # bound on what one capture keeps


@dataclass
class Segment:
    src: str
    dst: str
    sport: int
    dport: int
    payload: bytes


@dataclass
class Capture:
    """Every frame on ``ifname`` of namespace ``ns`` (both directions) while running."""

    ns: Namespace
    ifname: str = "eth0"
    frames: list[bytes] = field(default_factory=list)
    drops: int = 0
    packets: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _sock: socket.socket | None = None
    _kept: int = 0

    def start(self) -> None:
        def opened() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 32 * 1024 * 1024)
            sock.bind((self.ifname, 0))
            return sock

        self._sock = in_namespace(self.ns.name, opened)
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._read, name=f"capture-{self.ns.name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                frame = self._sock.recv(262144)
            except TimeoutError:
                continue
            except OSError:
                return
            if self._kept + len(frame) <= CAPTURE_CAP_BYTES:
                self.frames.append(frame)
                self._kept += len(frame)

    def stop(self) -> None:
        """Stop reading (drain what is queued), record the kernel's packet/drop counters, close."""
        if self._sock is None:
            return
        time.sleep(0.5)  # let the reader drain the queue
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        packets, drops = struct.unpack("II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.packets += packets
        self.drops += drops
        self._sock.close()
        self._sock = None

    def segments(self) -> list[Segment]:
        """TCP segments with a payload (IPv4 over Ethernet), in capture order."""
        out = []
        for frame in self.frames:
            if len(frame) < 34 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IP:
                continue
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack("!H", ip[2:4])[0]
            if ip[9] != socket.IPPROTO_TCP:
                continue
            tcp = ip[ihl:total] if total else ip[ihl:]
            if len(tcp) < 20:
                continue
            data_off = (tcp[12] >> 4) * 4
            payload = bytes(tcp[data_off:])
            if payload:
                sport, dport = struct.unpack("!HH", tcp[:4])
                out.append(Segment(socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), sport, dport, payload))
        return out

    def raw(self) -> bytes:
        return b"".join(self.frames)


def _flows(segments: list[Segment]) -> dict[tuple[str, str], bytes]:
    """Payload bytes per (src ip, dst ip), concatenated in capture order (markers split across
    segments are found too)."""
    flows: dict[tuple[str, str], bytearray] = {}
    for seg in segments:
        flows.setdefault((seg.src, seg.dst), bytearray()).extend(seg.payload)
    return {k: bytes(v) for k, v in flows.items()}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ms_line(proto: bytes) -> bytes:
    """One multistream-select message: uvarint length, protocol, newline."""
    return _varint(len(proto) + 1) + proto + b"\n"


def _plaintext_probe(src: Namespace, relay_ip: str) -> bytes:
    """Speak multistream-select to the relay's libp2p port from ``src``, then send MARKER in the
    clear; return what the relay answered."""
    sock = src.connect((relay_ip, P2P_PORT), timeout=10)
    received = bytearray()
    try:
        sock.sendall(_ms_line(b"/multistream/1.0.0") + _ms_line(b"/noise"))
        deadline = time.monotonic() + 10
        while b"/noise" not in received and time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
        sock.sendall(MARKER.encode())
        time.sleep(0.5)
    finally:
        sock.close()
    return bytes(received)


@pytest.fixture
def sym_sym(tmp_path: Path, model_path) -> Iterator[Swarm]:
    with nat_swarm(tmp_path, model_path("q8_0"), NatType.SYMMETRIC, NatType.SYMMETRIC) as swarm:
        yield swarm


def _relayed_path(s: Swarm) -> dict[str, Any]:
    def relayed() -> dict[str, Any] | None:
        entry = s.a.peer(s.b.peer_id)
        path = entry and entry["connection"]
        return path if path and path["kind"] == "relayed" else None

    path = until(relayed, 90, "A's relayed connection to B", retry_on=SETTLING)
    assert path is not None
    return path


def test_relay_forwards_only_ciphertext(sym_sym: Swarm) -> None:
    s = sym_sym
    for node in (s.a, s.b):

        def reserved(n: NatNode = node) -> bool:
            return bool(n.cluster()["nat"]["relays"])

        until(reserved, 90, f"a relay reservation at {node.ns.name}", retry_on=SETTLING)

    # Warm-up request: A dials B through a relay (the circuit and its Noise session exist afterwards).
    def chat() -> str | None:
        out = s.a.chat(MODEL, PROMPT, MAX_TOKENS, timeout=60)
        choice = out["choices"][0]
        assert choice["finish_reason"] in ("stop", "length"), out
        return choice["message"]["content"] or None

    until(chat, 120, "a chat answered through A", retry_on=SETTLING)
    relay_ids = {r.peer_id: r for r in s.relays}
    before = _relayed_path(s)
    assert before["relay"] in relay_ids, before
    relay = relay_ids[before["relay"]]

    captures = [Capture(r.ns) for r in s.relays]
    for cap in captures:
        cap.start()
    try:
        completion = until(chat, 120, "the captured chat answered through A", retry_on=SETTLING)
        assert completion
        after = _relayed_path(s)
    finally:
        for cap in captures:
            cap.stop()
    assert after["relay"] == before["relay"], (before, after)  # the whole chat crossed that relay
    assert len(completion.strip()) >= 8, completion  # long enough to be meaningful in a byte search

    wan_a = s.net.homes["a"].router.ip
    wan_b = s.net.homes["b"].router.ip
    marker = MARKER.encode()
    needles = [marker, completion.encode(), completion.strip().encode()]
    for cap in captures:
        assert cap.drops == 0, f"{cap.ns.name}: the kernel dropped {cap.drops} of {cap.packets} packets"
        raw = cap.raw()
        flows = _flows(cap.segments())
        for needle in needles:
            assert needle not in raw, f"{needle!r} crossed {cap.ns.name} in the clear"
            for key, data in flows.items():
                assert needle not in data, f"{needle!r} crossed {cap.ns.name} in the clear ({key})"

    # The chat's traffic is in the capture of the relay on the path, in every direction.
    cap = captures[s.relays.index(relay)]
    flows = _flows(cap.segments())
    ip = relay.ns.ip
    for peer_wan, least in ((wan_a, len(marker)), (wan_b, len(completion.encode()))):
        sent = len(flows.get((peer_wan, ip), b""))
        got = len(flows.get((ip, peer_wan), b""))
        assert sent >= least and got >= least, (peer_wan, sent, got, {k: len(v) for k, v in flows.items()})
    print(f"captured at {relay.ns.name}: {len(cap.frames)} frames; TCP payload bytes per flow:")
    for (src, dst), data in sorted(flows.items()):
        print(f"  {src} -> {dst}: {len(data)}")

    # Positive control: plaintext toward the same relay is seen by the same capture and search.
    control = Capture(relay.ns)
    control.start()
    try:
        answer = _plaintext_probe(s.net.homes["a"].host, ip)
    finally:
        control.stop()
    assert b"/multistream/1.0.0" in answer and b"/noise" in answer, answer
    assert control.drops == 0
    from_a = _flows(control.segments()).get((wan_a, ip), b"")
    to_a = _flows(control.segments()).get((ip, wan_a), b"")
    assert marker in from_a and b"/noise" in from_a, from_a[:200]
    assert b"/multistream/1.0.0" in to_a and b"/noise" in to_a, to_a[:200]
    # The relay is still serving after the junk handshake: the relayed chat still works.
    assert until(chat, 120, "a chat after the control", retry_on=SETTLING)
