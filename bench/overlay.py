"""Overlay benchmark: state propagation across 10 nodes, and forwarding cost vs a direct request.

1. Ten overlay services on loopback (in one process, each with its own libp2p host and trio
   thread) joined through node 0. Node 0 issues a new signed record; we time until all nine others
   hold it (gossipsub delta; anti-entropy only every 15 s, so this is gossip). Anchor: one RPC ping
   round trip between two of the nodes.
2. Two real ``potluck node start`` processes: a serving node (the model) and a forwarding node
   (another model, bootstrapped to the first). The same greedy streaming chat request goes to the
   serving node directly and through the forwarding node, interleaved; we report TTFT and decode
   tokens/s of both, and their ratios (forwarded / direct), plus the CPU time both node processes
   spend per completion token (user + system, ``psutil``): on a shared, loaded machine the rates
   swing with the neighbours, the CPU cost per token much less. The load average is printed too.

Run: ``.venv/bin/python bench/overlay.py [--part all|propagation|forwarding] [--reps 8]`` (about a
minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from potluck.config import Settings  # noqa: E402
from potluck.identity import load_or_create_identity  # noqa: E402
from potluck.overlay.service import OverlayService  # noqa: E402
from potluck.overlay.serving import LocalServing  # noqa: E402
from potluck.routing.router import Router  # noqa: E402
from tests.e2e.procs import NodeProcess, free_port, offline_env  # noqa: E402

MODEL = REPO.parent / "shared" / "models" / "tinyshakespeare-q8_0.gguf"
OTHER = REPO.parent / "shared" / "models" / "tinyshakespeare-q4_0.gguf"


async def propagation(tmp: Path, n: int = 10, rounds: int = 5) -> None:
    def settings(i: int, bootstrap: list[str]) -> Settings:
        return Settings(
            data_dir=tmp / f"s{i}", p2p_host="127.0.0.1", p2p_port=0, lan_discovery=False, dht_enabled=False,
            swarm="bench", state_interval_s=3600, anti_entropy_interval_s=15, bootstrap=bootstrap,
        )  # fmt: skip

    def svc(s: Settings) -> OverlayService:
        return OverlayService(s, load_or_create_identity(s.data_dir), LocalServing(Router()))

    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(svc(settings(0, [])))
        nodes = [first]
        for i in range(1, n):
            nodes.append(await stack.enter_async_context(svc(settings(i, [first.addrs[0]]))))
        deadline = time.monotonic() + 120
        while not all(len(x.state) == n for x in nodes):
            if time.monotonic() > deadline:
                raise SystemExit("the 10 nodes did not converge")
            await asyncio.sleep(0.05)
        await asyncio.sleep(3)  # let the gossip mesh settle (heartbeats)
        times = []
        for _ in range(rounds):
            signed = await first.publish_own_record()
            t0 = time.perf_counter()
            # A 1 ms measurement poll, on purpose: the bench must not add hooks to the code it times.
            while not all((r := x.state.get(first.peer_id)) and r.record.seq >= signed.record.seq for x in nodes):  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            times.append(time.perf_counter() - t0)
            await asyncio.sleep(0.5)
        rtts = [await nodes[1].measure_rtt(first.peer_id) for _ in range(20)]
        rtt = statistics.median(r for r in rtts if r is not None)
        prop = statistics.median(times)
        print(f"state change to all {n} nodes: median {prop * 1000:.1f} ms over {rounds} rounds "
              f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f})")  # fmt: skip
        print(f"RPC ping RTT (anchor): median {rtt * 1000:.2f} ms; propagation / RTT = {prop / rtt:.1f}x")


def stream_chat(url: str, model: str, max_tokens: int) -> tuple[float, float, int]:
    """(TTFT s, decode tokens/s after the first token, completion tokens) of one streamed request."""
    body = json.dumps({
        "model": model, "messages": [{"role": "user", "content": "ROMEO:\nBut soft, what light"}],
        "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }).encode()  # fmt: skip
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert first is not None and last is not None
    return first - t0, (tokens - 1) / max(last - first, 1e-9), tokens


def _cpu_s(procs: list[psutil.Process]) -> float:
    return sum(t.user + t.system for t in (p.cpu_times() for p in procs))


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def forwarding(tmp: Path, reps: int = 8, max_tokens: int = 200) -> None:
    p2p = free_port()
    env = {"POTLUCK_SWARM": "bench", "POTLUCK_N_THREADS": "1"}
    with NodeProcess(
        tmp / "serve", "-m", str(MODEL), "--p2p-port", str(p2p), env=offline_env(tmp / "serve", **env)
    ) as serve:
        serve.wait_ready()
        with urllib.request.urlopen(serve.url + "/api/node") as r:
            pid = json.loads(r.read())["peer_id"]
        fwd_env = offline_env(tmp / "fwd", **env)
        with NodeProcess(
            tmp / "fwd", "-m", str(OTHER), "--bootstrap", f"/ip4/127.0.0.1/tcp/{p2p}/p2p/{pid}", env=fwd_env
        ) as fwd:
            fwd.wait_ready()
            deadline = time.monotonic() + 60
            while True:
                with urllib.request.urlopen(fwd.url + "/v1/models") as r:
                    if any(m["id"] == MODEL.stem for m in json.loads(r.read())["data"]):
                        break
                if time.monotonic() > deadline:
                    raise SystemExit("the forwarding node never saw the model")
                time.sleep(0.2)
            stream_chat(serve.url, MODEL.stem, 16)  # warm-up both paths
            stream_chat(fwd.url, MODEL.stem, 16)
            nodes = [psutil.Process(serve.proc.pid), psutil.Process(fwd.proc.pid)]
            direct: list[tuple[float, float, int, float]] = []
            forwarded: list[tuple[float, float, int, float]] = []
            print(f"forwarding: load average {_load()} before")
            for _ in range(reps):  # interleaved, so machine load hits both alike
                for url, out in ((serve.url, direct), (fwd.url, forwarded)):
                    cpu = _cpu_s(nodes)
                    ttft, tps, tokens = stream_chat(url, MODEL.stem, max_tokens)
                    out.append((ttft, tps, tokens, (_cpu_s(nodes) - cpu) / max(tokens, 1)))
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    d_ttft, f_ttft = med(direct, 0), med(forwarded, 0)
    d_tps, f_tps = med(direct, 1), med(forwarded, 1)
    d_cpu, f_cpu = med(direct, 3), med(forwarded, 3)
    print(
        f"direct:    TTFT {d_ttft * 1000:.1f} ms, decode {d_tps:.0f} tok/s, both nodes' CPU {d_cpu * 1e3:.2f} ms/token "
        f"({reps} requests x {max_tokens} tokens)"
    )
    print(
        f"forwarded: TTFT {f_ttft * 1000:.1f} ms, decode {f_tps:.0f} tok/s, both nodes' CPU {f_cpu * 1e3:.2f} ms/token"
    )
    print(
        f"ratios (forwarded / direct): TTFT {f_ttft / d_ttft:.2f}x, decode tokens/s {f_tps / d_tps:.2f}x, "
        f"CPU per token {f_cpu / d_cpu:.2f}x; load average {_load()} after"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "propagation", "forwarding"], default="all")
    parser.add_argument("--reps", type=int, default=8, help="requests per path (forwarding)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("all", "propagation"):
            asyncio.run(propagation(Path(tmp) / "prop"))
        if args.part in ("all", "forwarding"):
            forwarding(Path(tmp) / "fwd", reps=args.reps)


if __name__ == "__main__":
    main()
