"""NAT traversal benchmark in the emulated internet (tests/netem): per topology, time to the first
successful request, and decode tokens/s over the relayed path versus the hole-punched direct path.

Topologies (node A asks, node B behind its own NAT serves the model; two public relays):
  eim+eim (hole punching works), eim+sym and sym+sym (traffic stays on a relay).

Figures, all from one run:
  * first request: seconds from "all nodes ready" to the first complete answer through A, and the
    path it took (relayed: DCUtR upgrades later).
  * decode tokens/s through A over the settled path (eim+eim: hole-punched, else relayed), and B's
    own decode speed (asked locally: the anchor). Ratios: path / local and relayed / direct.

Needs root (network namespaces) and the fixture models in ../shared/models.

    sudo .venv/bin/python bench/nat.py [--tokens 128] [--delay-ms 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.natnet import NatNode, Swarm, nat_swarm, until  # noqa: E402
from tests.netem import NatType, missing_requirements  # noqa: E402

MODEL_FILE = REPO.parent / "shared" / "models" / "tinyshakespeare-q8_0.gguf"
MODEL = "tinyshakespeare-q8_0"
PROMPT = "ROMEO:"
TOPOLOGIES = [("eim+eim", NatType.EIM, NatType.EIM), ("eim+sym", NatType.EIM, NatType.SYMMETRIC),
              ("sym+sym", NatType.SYMMETRIC, NatType.SYMMETRIC)]  # fmt: skip


def decode_tps(node: NatNode, tokens: int) -> float:
    """Streamed chunks per second between the first and the last chunk (greedy, one request)."""
    stamps = [time.perf_counter() for _ in node.chat_stream(MODEL, PROMPT, tokens)]
    if len(stamps) < 2:
        raise RuntimeError(f"only {len(stamps)} chunks streamed")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def first_request(s: Swarm) -> float:
    t0 = time.monotonic()

    def ask() -> bool:
        out = s.a.chat(MODEL, PROMPT, 16, timeout=60)
        return bool(out["choices"][0]["message"]["content"].strip())

    until(ask, 180, "first request through A", interval=0.2)
    return time.monotonic() - t0


def path_kind(s: Swarm) -> str:
    entry = s.a.peer(s.b.peer_id)
    conn = entry and entry["connection"]
    return conn["kind"] if conn else "none"


def run(name: str, nat_a: NatType, nat_b: NatType, tokens: int, delay_ms: float, tmp: Path) -> dict[str, object]:
    with nat_swarm(tmp / name, MODEL_FILE, nat_a, nat_b, delay_ms=delay_ms) as s:
        ttfr = first_request(s)
        first_path = path_kind(s)
        if nat_a is NatType.EIM and nat_b is NatType.EIM:
            until(lambda: path_kind(s) == "hole-punched", 90, "hole punch")
        else:
            time.sleep(25)  # let DCUtR try (and fail) so the settled path is measured
        settled = path_kind(s)
        local = decode_tps(s.b, tokens)
        remote = decode_tps(s.a, tokens)
    return {"name": name, "ttfr": ttfr, "first_path": first_path, "path": settled, "local": local, "remote": remote}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="tokens per decode measurement")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay on each public link (tc netem)")
    args = ap.parse_args()
    reason = missing_requirements()
    if reason:
        sys.exit(f"bench/nat.py cannot run: {reason}")
    with tempfile.TemporaryDirectory(prefix="potluck-bench-nat-") as tmp:
        rows = [run(n, a, b, args.tokens, args.delay_ms, Path(tmp)) for n, a, b in TOPOLOGIES]
    print(f"\nNAT traversal, {args.tokens} tokens, one-way delay {args.delay_ms} ms per public link")
    print(f"{'topology':<9} {'first req s':>11} {'first path':>12} {'settled path':>13} "
          f"{'B local tok/s':>13} {'via A tok/s':>11} {'via A/local':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['name']:<9} {r['ttfr']:>11.2f} {r['first_path']:>12} {r['path']:>13} "
              f"{r['local']:>13.1f} {r['remote']:>11.1f} {r['remote'] / r['local']:>11.2f}")  # type: ignore[operator]  # fmt: skip
    direct = next(r for r in rows if r["path"] == "hole-punched")
    for r in rows:
        if r["path"] == "relayed":
            print(f"relayed/direct decode tokens/s ({r['name']} vs {direct['name']}): "
                  f"{r['remote'] / direct['remote']:.2f}")  # type: ignore[operator]  # fmt: skip
            print(f"relayed/direct time to first request ({r['name']} vs {direct['name']}): "
                  f"{r['ttfr'] / direct['ttfr']:.2f}")  # type: ignore[operator]  # fmt: skip


if __name__ == "__main__":
    main()
