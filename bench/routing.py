"""Routing benchmark: the router's chosen route against an oracle that tried every route.

A mixed swarm of real ``potluck node start`` processes on loopback: the client's node C (another
model) and three peers serving the fixture model, each capped by ``serve_rate_limit_tps`` and
serving one generation at a time (``parallel = 1``):

* ``idle``   capped at ``--fast-tps`` tokens/s, nothing else to do;
* ``loaded`` capped at ``--fast-tps`` too, but kept busy: ``--background`` request loops pinned to it
  (``X-Potluck-Route-Pin``) through C, so its queue is never empty;
* ``slow``   capped at ``--slow-tps`` tokens/s.

Each round sends the same greedy streaming request once per route, pinned (the oracle's trials),
and once unpinned (the router's choice, read back from ``X-Potluck-Route``), in a shuffled order.
Per round the oracle is the pinned trial that completed soonest (TTFT + tokens / decode speed). We
print each round, how often the router chose the oracle's route, and the ratios over all rounds,
oriented so that higher is better and 1.0 matches the oracle: TTFT (oracle / chosen, medians),
decode tokens/s (chosen / oracle, medians) and completion time (oracle / chosen, medians); the goal
is >= 0.9x. TTFTs of an idle loopback peer are tens of milliseconds, so their ratio is noisy.

Run: ``.venv/bin/python bench/routing.py [--rounds 6] [--max-tokens 48]`` (about two minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.procs import NodeProcess, free_port, get_json, swarm_env  # noqa: E402

MODEL = REPO.parent / "shared" / "models" / "tinyshakespeare-q8_0.gguf"
OTHER = REPO.parent / "shared" / "models" / "tinyshakespeare-q4_0.gguf"
PROMPT = "ROMEO:\nBut soft, what light"


def stream(url: str, max_tokens: int, pin: str | None = None) -> tuple[float, float, int, str]:
    """(TTFT s, decode tokens/s after the first token, completion tokens, X-Potluck-Route) of one request."""
    body = json.dumps({
        "model": MODEL.stem, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }).encode()  # fmt: skip
    headers = {"Content-Type": "application/json"}
    if pin:
        headers["X-Potluck-Route-Pin"] = pin
    req = urllib.request.Request(url + "/v1/chat/completions", body, headers)
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=300) as resp:
        route = resp.headers.get("X-Potluck-Route", "")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk}")
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert first is not None and last is not None
    return first - t0, (tokens - 1) / max(last - first, 1e-9), tokens, route


class Background:
    """``n`` request loops pinned to one peer through the client node, until stopped."""

    def __init__(self, url: str, pin: str, n: int, max_tokens: int) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(url, pin, max_tokens), daemon=True) for _ in range(n)]

    def _loop(self, url: str, pin: str, max_tokens: int) -> None:
        while not self.stop.is_set():
            try:
                stream(url, max_tokens, pin)
            except (OSError, RuntimeError) as exc:
                print(f"  background request failed: {exc}", file=sys.stderr)
                time.sleep(0.5)

    def __enter__(self) -> Background:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--fast-tps", type=float, default=40.0, help="rate cap of the idle and loaded peers")
    parser.add_argument("--slow-tps", type=float, default=10.0, help="rate cap of the slow peer")
    parser.add_argument("--background", type=int, default=2, help="request loops keeping the loaded peer busy")
    args = parser.parse_args()
    random.seed(14)
    tmp = Path(tempfile.mkdtemp(prefix="potluck-bench-routing-"))
    swarm, secret = f"bench-routing-{os.getpid()}", "bench-routing-secret"
    boot_port = free_port()
    nodes: list[NodeProcess] = []
    try:
        client = NodeProcess(
            tmp / "c", "-m", str(OTHER), "--p2p-port", str(boot_port), env=swarm_env(tmp / "c", swarm, secret, "0")
        )
        nodes.append(client)
        client.wait_ready()
        boot = f"/ip4/127.0.0.1/tcp/{boot_port}/p2p/{get_json(client.url + '/api/node')['peer_id']}"
        caps = {"idle": args.fast_tps, "loaded": args.fast_tps, "slow": args.slow_tps}
        peers: dict[str, str] = {}
        for name, cap in caps.items():
            env = swarm_env(tmp / name, swarm, secret, str(cap), POTLUCK_PARALLEL="1")
            node = NodeProcess(tmp / name, "-m", str(MODEL), "--bootstrap", boot, env=env)
            nodes.append(node)
            node.wait_ready()
            peers[name] = "peer:" + get_json(node.url + "/api/node")["peer_id"]
        names = {key: name for name, key in peers.items()}

        def explain() -> dict[str, dict]:
            plan = get_json(f"{client.url}/api/route/explain?model={MODEL.stem}&max_tokens={args.max_tokens}")
            return {c["key"]: c for c in plan["candidates"]}

        deadline = time.monotonic() + 90
        while not all(k in explain() and explain()[k]["allowed"] for k in peers.values()):
            if time.monotonic() > deadline:
                raise SystemExit(f"the client never saw all three peers: {explain()}")
            time.sleep(0.5)
        for key in peers.values():  # warm-up: every route once (this also measures each route's speed)
            stream(client.url, 16, key)
        print(
            f"swarm: idle and loaded peers capped at {args.fast_tps:g} tok/s, slow at {args.slow_tps:g} tok/s; "
            f"{args.background} background loops on the loaded peer; {args.max_tokens} tokens per request"
        )
        rows = []
        with Background(client.url, peers["loaded"], args.background, args.max_tokens):
            time.sleep(2.0)  # let the loaded peer's queue show in its signed record (1 s heartbeats)
            for r in range(args.rounds):
                trials: dict[str, tuple[float, float, int, str]] = {}
                order = [*peers.values(), "chosen"]
                random.shuffle(order)
                for key in order:
                    trials[key] = stream(client.url, args.max_tokens, None if key == "chosen" else key)
                ttft, tps, tokens, route = trials.pop("chosen")
                chosen_key = route.split("key=", 1)[1].split(";", 1)[0] if "key=" in route else "?"
                total = lambda t: t[0] + t[2] / t[1]  # noqa: E731 - completion time of a trial, s
                oracle_key = min(trials, key=lambda k: total(trials[k]))
                oracle = trials[oracle_key]
                rows.append(
                    (ttft, tps, total((ttft, tps, tokens, route)), *oracle[:2], total(oracle), chosen_key == oracle_key)
                )
                per = ", ".join(f"{names[k]} {t[0] * 1000:.0f} ms / {t[1]:.1f} tok/s" for k, t in trials.items())
                print(f"round {r + 1}: chose {names.get(chosen_key, chosen_key)}: TTFT {ttft * 1000:.0f} ms, "
                      f"{tps:.1f} tok/s | oracle: {names[oracle_key]} | trials: {per}")  # fmt: skip
        plan = explain()
        print("router's view at the end: " + ", ".join(
            f"{names[k]} score {c['score']:.2f} (tps {c['tps']:.1f} {c['tps_source']}, queue {c['queue']})"
            for k, c in plan.items() if k in names
        ))  # fmt: skip
        med = lambda i: statistics.median(x[i] for x in rows)  # noqa: E731
        same = sum(x[6] for x in rows)
        print(f"chosen: median TTFT {med(0) * 1000:.0f} ms, {med(1):.1f} tok/s, completion {med(2):.2f} s; "
              f"oracle: median TTFT {med(3) * 1000:.0f} ms, {med(4):.1f} tok/s, completion {med(5):.2f} s")  # fmt: skip
        print(
            f"ratios vs the oracle over {len(rows)} rounds (goal >= 0.90x): TTFT (oracle / chosen) "
            f"{med(3) / med(0):.2f}x, decode tokens/s (chosen / oracle) {med(1) / med(4):.2f}x, completion time "
            f"(oracle / chosen) {med(5) / med(2):.2f}x; the router chose the oracle's route {same}/{len(rows)} times"
        )
    finally:
        for node in reversed(nodes):
            node.stop()


if __name__ == "__main__":
    main()
