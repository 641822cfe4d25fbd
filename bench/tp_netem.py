"""The tensor-parallel cost model against real link delay: predicted vs measured ms/token (issue #11, item 5).

    sudo .venv/bin/python bench/tp_netem.py [--nodes 2,4] [--links wired,wifi] [--tokens 32] [--rounds 3]
                                            [--dir DIR] [--emulator auto|netem|tun] [--json]

Topology (:mod:`tests.netem.star`): the master is this process, in the root namespace; worker rank
``r`` runs in its own namespace with its own link to the master. Each link setting of
:data:`potluck.sharding.orchestration.forecast.LINKS` (wired: 0.3 ms RTT, 1 Gbit/s; wifi: 3 ms,
100 Mbit/s) delays each direction of every link by RTT/2 and serializes it at the link's rate:
``tc qdisc netem`` where the kernel has it, else a TUN delay line (``--emulator``).

The RTT the prediction uses is measured: median of 20 pings from each worker namespace, the slowest
worker's. A crashed run's namespaces and interfaces are removed at the next start.

Calibration: the model's weight term needs each device's weight-streaming bandwidth, measured with
an N = 1 group with one thread (one "device" = one core): bandwidth = weight bytes read per token /
compute seconds per token. The machine's speed drifts, so this N = 1 group decodes just before and
just after every measurement and the mean of the two is used (as ``bench/tp_decode.py`` brackets its
runs with llama.cpp). Bytes read per token are counted as ``forecast.py`` counts them
(:func:`~potluck.sharding.format.cost.rank_sizing`, no budget): the rank's layer slices (its KV
groups and FFN columns, with the norms) and its rows of the vocab-parallel output head, at the GGUF's
bytes times :data:`~potluck.sharding.format.cost.PREPACK_GROWTH`, plus its KV cache at ``n_ctx``
(256 here: under 1 %); not the token embeddings, of which a token reads one row. The growth factor
cancels between calibration and prediction. Every rank runs one thread; with more ranks than cores
they share cores, so a rank's bandwidth is the calibrated one times ``min(1, cores / N)``. The
prediction is :func:`~potluck.sharding.format.cost.predict_s_per_token` on those ranks and
``LinkCost(measured RTT, link rate)``: two all-reduces per layer and the token's broadcast and
logits gather, without any exchange overhead (``overhead_s = 0``).

Measured, ``--rounds`` times (the table shows medians and the ratios' ranges): greedy decode of
``--tokens`` tokens after the prompt and one warm-up token (as ``bench/tp_decode.py``, whose model
this is, built if missing), wall ms/token, every rank's compute / all-reduce (communication plus
waiting) ms/token from the engine's stats, and the tun delay line's CPU per token. Rows per N:

* ``lo``: a second group of N ranks over loopback TCP, no namespaces and no emulator (reference);
* ``none``: the emulated links without added delay or rate limit (plain veth, or the delay line at 0);
* one per ``--links`` setting.

What a token costs beyond weight streaming and the wire (ranks computing in 2 x layers segments
between exchanges, the Python star, TCP, the emulator) is the model's ``overhead_s`` per exchange.
The ``none`` row measures it: (measured - predicted) / (2 x layers + 1), same N and round; the
``+overhead`` columns predict the delayed rows with it, which checks the link term on its own.

Needs root and ``ip``, ``tc``, ``ping``. The load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from gguf import GGUFReader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.tp_decode import PROMPT, build_model  # noqa: E402
from potluck.errors import PotluckError  # noqa: E402
from potluck.sharding.compute.engine import EngineOptions, RankStats, TPMaster  # noqa: E402
from potluck.sharding.format.cost import LinkCost, RankCost, predict_s_per_token, rank_sizing  # noqa: E402
from potluck.sharding.format.extract import plan_geometry  # noqa: E402
from potluck.sharding.format.gguf_tensors import read_config  # noqa: E402
from potluck.sharding.format.plan import NodeCapability, ShardPlan  # noqa: E402
from potluck.sharding.orchestration.forecast import LINKS  # noqa: E402
from potluck.sharding.orchestration.launch import ProcessGroup  # noqa: E402
from tests.netem import NetemError, missing_requirements  # noqa: E402
from tests.netem.star import MASTER_IP, StarNet, ping_s, star_net  # noqa: E402

MODEL_NAME = "bench-llama-1.1b-random-q4_0.gguf"  # bench/tp_decode.py's file
N_CTX = 256


# ---------------------------------------------------------------------------------- measurements
@dataclass(frozen=True)
class Row:
    """One measurement: times in ms per token, RTTs in ms, per-rank lists in rank order.

    Attributes:
        core_gbs: the calibrated weight-streaming bandwidth of one core (N = 1 runs just before
            and after this one, their mean), GB/s of prepacked weights.
        weights_ms, link_ms: the prediction's two terms (slowest rank's weights; all-reduces).
        emulator_ms: CPU the link emulator used per token (the tun delay line; 0 for netem).
        overhead_ms: measured - predicted of the same N and round without added delay: the
            exchange overhead of all 2 x layers + 1 exchanges of a token (module docstring);
            ``adjusted_ms`` is the prediction with it.
    """

    round: int
    nodes: int
    link: str
    rtt_set_ms: float
    rtt_ms: float
    core_gbs: float
    measured_ms: float
    predicted_ms: float
    weights_ms: float
    link_ms: float
    emulator_ms: float
    compute_ms: list[float]
    allreduce_ms: list[float]
    overhead_ms: float = 0.0

    @property
    def ratio(self) -> float:
        return self.measured_ms / self.predicted_ms

    @property
    def adjusted_ms(self) -> float:
        return self.predicted_ms + self.overhead_ms


def weight_bytes(reader: GGUFReader, plan: ShardPlan) -> list[float]:
    """Bytes each rank reads per decoded token, as ``forecast.py`` counts them: the resident bytes of
    :func:`~potluck.sharding.format.cost.rank_sizing` without a budget (module docstring)."""
    extra = plan_geometry(reader, read_config(reader), plan.n_ctx).master_bytes
    sizings = [rank_sizing(plan, r, 0, extra if r == 0 else 0) for r in range(plan.world_size)]
    return [s.weights + s.fixed for s in sizings]


def decode(master: TPMaster, tokens: int) -> tuple[float, list[RankStats]]:
    """Greedy decode after the prompt and one warm-up token: seconds per token, every rank's stats."""
    token = int(np.argmax(master.forward(PROMPT, 0)[-1]))
    pos = len(PROMPT)
    token = int(np.argmax(master.forward([token], pos)[-1]))  # warm-up
    pos += 1
    master.reset_stats()
    t0 = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(master.forward([token], pos)[-1]))
        pos += 1
    return (time.perf_counter() - t0) / tokens, master.gather_stats()


def core_bandwidth(anchor: ProcessGroup, tokens: int) -> float:
    """Weight-streaming bytes/s of one core: an N = 1, one-thread group's weights / compute s per token."""
    _, stats = decode(anchor.master, tokens)
    return weight_bytes(anchor.reader, anchor.plan)[0] / (stats[0].compute_s / max(stats[0].steps, 1))


def _group(model: Path, n: int, shard_dir: Path, net: StarNet | None) -> ProcessGroup:
    """``n`` ranks, one thread each; the workers in ``net``'s namespaces."""
    nodes = [NodeCapability(f"local-{r}", 8 << 30, 1.0) for r in range(n)]
    options = EngineOptions(n_ctx=N_CTX)
    if net is None:
        return ProcessGroup(model, nodes, options, shard_dir, timeout_s=60.0, cores=n)
    return ProcessGroup(
        model, nodes, options, shard_dir, timeout_s=60.0, cores=n, host=MASTER_IP, worker_prefix=net.prefix
    )


@dataclass(frozen=True)
class Setup:
    """What every measurement shares: the model file, the N = 1 anchor group, the links."""

    model: Path
    shard_dir: Path
    anchor: ProcessGroup
    net: StarNet
    tokens: int
    cores: int


def measure(setup: Setup, n: int, links: Sequence[str], rounds: int) -> list[Row]:
    """A group of ``n`` ranks over loopback (no emulator: "lo") and one over the emulated links,
    measured ``rounds`` times: "lo", without added delay ("none"), then under each named link. Every
    row carries its round's zero-delay overhead (of "none")."""
    rows = []
    with (
        _group(setup.model, n, setup.shard_dir, None) as lo,
        _group(setup.model, n, setup.shard_dir, setup.net) as group,
    ):
        for rnd in range(rounds):
            rows.append(_row(setup, lo, rnd, "lo"))
            zero = _row(setup, group, rnd, "none")
            overhead = zero.measured_ms - zero.predicted_ms
            rows += [replace(r, overhead_ms=overhead) for r in [zero, *(_row(setup, group, rnd, x) for x in links)]]
    return rows


def _row(setup: Setup, group: ProcessGroup, rnd: int, name: str) -> Row:
    """One measurement of ``group`` under link ``name`` ("none": no added delay or rate limit; "lo":
    ``group`` runs over loopback, the emulated links are not involved)."""
    n = len(group.nodes)
    config = read_config(group.reader)
    link = LINKS.get(name)
    if name == "lo":
        rtt = ping_s([], "127.0.0.1")
    else:
        setup.net.set_link(link)
        rtt = setup.net.rtt_s(range(1, n))
    before = core_bandwidth(setup.anchor, setup.tokens)
    cpu0 = setup.net.cpu_s()
    s_tok, stats = decode(group.master, setup.tokens)
    emulator = (setup.net.cpu_s() - cpu0) / (setup.tokens + 2)  # + the prompt and the warm-up
    bw = (before + core_bandwidth(setup.anchor, setup.tokens)) / 2
    ranks = [RankCost(b, 0.0, bw * min(1.0, setup.cores / n), math.inf) for b in weight_bytes(group.reader, group.plan)]
    predicted = predict_s_per_token(
        ranks, config.n_layers, config.hidden, LinkCost(rtt, link.bandwidth if link else math.inf), config.vocab
    )
    weights = predict_s_per_token(ranks, config.n_layers, config.hidden, None)
    row = Row(
        round=rnd,
        nodes=n,
        link=name,
        rtt_set_ms=link.rtt_s * 1e3 if link else 0.0,
        rtt_ms=rtt * 1e3,
        core_gbs=bw / 1e9,
        measured_ms=s_tok * 1e3,
        predicted_ms=predicted * 1e3,
        weights_ms=weights * 1e3,
        link_ms=(predicted - weights) * 1e3,
        emulator_ms=emulator * 1e3,
        compute_ms=[s.compute_s / max(s.steps, 1) * 1e3 for s in stats],
        allreduce_ms=[s.comm_s / max(s.steps, 1) * 1e3 for s in stats],
    )
    print(
        f"  round {rnd} N={n} {name}: {row.measured_ms:.1f} ms/token, predicted {row.predicted_ms:.1f}", file=sys.stderr
    )
    return row


def table(rows: Sequence[Row]) -> str:
    """Medians over rounds per (N, link), aligned; ratios' ranges over rounds in brackets."""
    med = statistics.median
    lines = [
        f"{'N':>2} {'link':<5} {'RTT set':>7} {'RTT ping':>8} {'measured':>8} {'predicted':>9} {'ratio [range]':>16}"
        f" {'pred weights | link':>19} {'+overhead':>9} {'ratio [range]':>16} {'emu CPU':>7}"
        "   per rank: compute | all-reduce"
    ]
    for key in dict.fromkeys((r.nodes, r.link) for r in rows):
        rs = [r for r in rows if (r.nodes, r.link) == key]
        ratios = [r.ratio for r in rs]
        adjusted = [r.measured_ms / r.adjusted_ms for r in rs]
        second = (
            f"{med(r.adjusted_ms for r in rs):>9.1f} {med(adjusted):>5.2f} [{min(adjusted):.2f}-{max(adjusted):.2f}]"
            if key[1] not in ("none", "lo")
            else f"{'(fit)' if key[1] == 'none' else '':>9} {'':>16}"
        )
        ranks = "  ".join(
            f"r{i}: {med(r.compute_ms[i] for r in rs):5.1f} | {med(r.allreduce_ms[i] for r in rs):5.1f}"
            for i in range(key[0])
        )
        lines.append(
            f"{key[0]:>2} {key[1]:<5} {rs[0].rtt_set_ms:>7.2f} {med(r.rtt_ms for r in rs):>8.3f}"
            f" {med(r.measured_ms for r in rs):>8.1f} {med(r.predicted_ms for r in rs):>9.1f}"
            f" {med(ratios):>5.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
            f" {med(r.weights_ms for r in rs):>8.1f} | {med(r.link_ms for r in rs):>8.1f} {second}"
            f" {med(r.emulator_ms for r in rs):>7.1f}   {ranks}"
        )
    return "\n".join(lines)


def overheads(rows: Sequence[Row], layers: int) -> list[str]:
    """Per N: the zero-delay overhead (median), per token and per all-reduce, and how much of it is
    the slowest rank's compute above the predicted weight term."""
    out = []
    for n in dict.fromkeys(r.nodes for r in rows):
        zero = [r for r in rows if r.nodes == n and r.link == "none"]
        ovh = statistics.median(r.overhead_ms for r in zero)
        extra = statistics.median(max(r.compute_ms) - r.weights_ms for r in zero)
        out.append(
            f"N = {n}: zero-delay overhead {ovh:.1f} ms/token ({ovh / (2 * layers + 1) * 1e3:.0f} us per exchange), "
            f"of which the slowest rank's compute above the weight term: {extra:.1f} ms"
        )
    return out


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(args: argparse.Namespace) -> dict[str, object]:
    """Measure every N under every link setting, ``args.rounds`` times; the results, JSON-able."""
    cores = os.cpu_count() or 1
    args.dir.mkdir(parents=True, exist_ok=True)
    model = args.dir / MODEL_NAME
    if not model.is_file():
        build_model(model)
    net = star_net(max(args.nodes) - 1, args.emulator)
    kind = type(net).__name__
    load_start = _load()
    print(f"load average at start: {load_start}; link emulator: {kind}", file=sys.stderr)
    shard_dir = args.dir / "tp_netem-shards"
    with _group(model, 1, shard_dir, None) as anchor, net:
        setup = Setup(model, shard_dir, anchor, net, args.tokens, cores)
        rows = [r for n in args.nodes for r in measure(setup, n, args.links, args.rounds)]
        layers = read_config(anchor.reader).n_layers
    return {
        "model": model.name,
        "emulator": kind,
        "cores": cores,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "layers": layers,
        "load_start": load_start,
        "load_end": _load(),
        "rows": [{**asdict(r), "ratio": r.ratio, "adjusted_ms": r.adjusted_ms} for r in rows],
    }


def report(result: dict[str, object]) -> str:
    """The header lines, the table and the zero-delay overheads."""
    names = {f.name for f in fields(Row)}
    rows = [Row(**{k: v for k, v in r.items() if k in names}) for r in result["rows"]]  # type: ignore[attr-defined]
    gbs = [r.core_gbs for r in rows]
    return "\n".join(
        [
            f"model {result['model']}, {result['tokens']} tokens per measurement, {result['rounds']} rounds "
            f"(medians shown), {result['cores']} cores, one thread per rank, link emulator: {result['emulator']}",
            f"calibration: N = 1, 1 thread, just before and after each measurement: {min(gbs):.1f}-{max(gbs):.1f} "
            f"GB/s of prepacked weights per core; a rank's bandwidth = that x min(1, {result['cores']} / N)",
            f"load average: start {result['load_start']}, end {result['load_end']}; times in ms per token",
            "",
            table(rows),
            "",
            *overheads(rows, result["layers"]),  # type: ignore[arg-type]
        ]
    )


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    from potluck.config import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="2,4", help="comma-separated rank counts (>= 2)")
    ap.add_argument("--links", default="wired,wifi", help=f"comma-separated link settings of {sorted(LINKS)}")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per (N, link); the table shows medians")
    ap.add_argument("--dir", type=Path, default=default_cache_dir() / "bench", help="model (and shard) cache")
    ap.add_argument("--emulator", choices=("auto", "netem", "tun"), default="auto", help="how links get delay")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    args = ap.parse_args(argv)
    args.nodes = [int(x) for x in args.nodes.split(",")]
    args.links = [x for x in args.links.split(",") if x]
    if min(args.nodes) < 2 or any(x not in LINKS for x in args.links) or min(args.tokens, args.rounds) < 1:
        ap.error(f"--nodes must be >= 2, --links among {sorted(LINKS)}, --tokens and --rounds >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    reason = missing_requirements() or next((f"`{t}` is missing" for t in ("tc", "ping") if not shutil.which(t)), None)
    if reason:
        print(f"bench/tp_netem.py cannot run: {reason}", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except (PotluckError, NetemError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench/tp_netem.py failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
