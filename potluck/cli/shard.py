"""``potluck shard ...``: plan a tensor-parallel split and generate with N local processes."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from potluck.errors import PotluckError

shard_app = typer.Typer(help="Tensor parallelism: plan shards, generate across worker processes.", no_args_is_help=True)
console = Console(stderr=True)
log = logging.getLogger(__name__)

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="GGUF file.", exists=True, dir_okay=False)]
NodesOpt = Annotated[int, typer.Option("--nodes", "-n", min=1, max=64, help="Ranks (master + N-1 workers).")]
AccuracyOpt = Annotated[
    int,
    typer.Option(
        "--accuracy-level",
        min=0,
        max=4,
        help="MatMulNBits activations: 4 = int8 per block, as llama.cpp (fast); 0 = float32 (exact, slower).",
    ),
]


class Attention(StrEnum):
    """The engine's attention block (``EngineOptions.attention``)."""

    exact = "exact"
    fused = "fused"


AttentionOpt = Annotated[
    Attention,
    typer.Option(
        "--attention",
        help="exact = llama.cpp's F16-cache attention bit for bit; fused = one ONNX Runtime kernel "
        "(faster, same perplexity, greedy answers diverge from llama.cpp's sooner).",
    ),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-budget",
        help="Resident memory per rank for the model (e.g. 2GiB, 512MiB): a rank whose slices exceed "
        "it keeps a sliding window of layers and streams the rest from disk.",
    ),
]
SpeedsOpt = Annotated[
    str | None, typer.Option("--speeds", help="Comma-separated relative speeds per rank (default: equal).")
]


def _nodes(n: int, speeds: str | None, ram_bytes: int):
    from potluck.sharding.format.plan import NodeCapability

    values = [float(s) for s in speeds.split(",")] if speeds else [1.0] * n
    if len(values) != n:
        raise typer.BadParameter(f"--speeds needs {n} values")
    return [NodeCapability(f"local-{r}", ram_bytes, v) for r, v in enumerate(values)]


def _size(value: str | None) -> int:
    """Bytes of a size such as ``2GiB``, ``512MB`` or ``1500000`` (pydantic's ``ByteSize``); 0 for ``None``."""
    if value is None:
        return 0
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(value))
    except ValidationError as exc:
        raise typer.BadParameter(f"{value!r} is not a size such as 2GiB, 512MiB or 1500000000") from exc


def _free_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


@contextmanager
def _process_group(
    model: Path,
    nodes: int,
    speeds: str | None,
    n_ctx: int,
    shard_dir: Path | None,
    timeout: float,
    accuracy_level: int,
    memory_budget: str | None,
    attention: Attention = Attention.exact,
) -> Iterator[Any]:
    """A master plus ``nodes - 1`` worker processes on this machine; worker shards go to
    ``shard_dir`` (a temporary directory, removed afterwards, when ``None``)."""
    from potluck.sharding.compute.engine import EngineOptions
    from potluck.sharding.orchestration.launch import ProcessGroup

    with ExitStack() as stack:
        directory = shard_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="potluck-shards-")))
        ram = _free_ram() // nodes
        options = EngineOptions(
            n_ctx=n_ctx, accuracy_level=accuracy_level, memory_budget=_size(memory_budget), attention=attention.value
        )
        yield stack.enter_context(
            ProcessGroup(model, _nodes(nodes, speeds, ram), options, directory, timeout_s=timeout)
        )


@shard_app.command("plan")
def plan_cmd(
    model: ModelOpt,
    nodes: Annotated[
        int | None, typer.Option("--nodes", "-n", min=1, max=64, help="Ranks (master + N-1 workers); default 2.")
    ] = None,
    speeds: SpeedsOpt = None,
    n_ctx: Annotated[int, typer.Option("--ctx", min=16, help="KV-cache tokens per rank.")] = 2048,
    predict: Annotated[
        bool,
        typer.Option(
            "--predict",
            help="Instead of one plan: predicted s/token for 1..--max-nodes devices like this one (measured "
            "memory and disk bandwidth, --memory-budget each, --link), and the group it would pick.",
        ),
    ] = False,
    max_nodes: Annotated[
        int | None, typer.Option("--max-nodes", min=1, max=64, help="Largest group to predict (default 8).")
    ] = None,
    memory_budget: BudgetOpt = None,
    link: Annotated[
        str | None, typer.Option("--link", help="wired (0.3 ms, 1 Gbit/s; default) or wifi (3 ms, 100 Mbit/s).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable forecast (the plan itself is always JSON).")
    ] = False,
    swarm: Annotated[
        bool,
        typer.Option(
            "--swarm",
            help="With --predict: forecast groups of the live swarm a running node sees (GET /api/cluster: "
            "each peer's advertised budget and bandwidths, the node's measured RTTs), that node as master.",
        ),
    ] = False,
    url: Annotated[str | None, typer.Option("--url", help="With --swarm: the node's API base URL.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", help="With --swarm: key for the node's API.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="With --swarm: TOML config file.")] = None,
) -> None:
    """Print the shard plan (JSON) for N equal-memory nodes, or with --predict the forecast per group size."""
    from potluck.config import default_memory_budget
    from potluck.sharding.format.gguf_tensors import open_gguf
    from potluck.sharding.orchestration.group import plan_for

    # Each flag belongs to one of the two modes: one given to the other mode is refused, not ignored.
    swarm_only = {"--url": url, "--api-key": api_key, "--config": config}
    if not predict:
        given = {"--max-nodes": max_nodes, "--memory-budget": memory_budget, "--link": link, **swarm_only}
        given["--swarm"] = swarm or None
    elif swarm:  # budgets, bandwidths and RTTs come from the swarm's records
        given = {"--nodes": nodes, "--speeds": speeds, "--max-nodes": max_nodes, "--memory-budget": memory_budget}
        given["--link"] = link
    else:
        given = {"--nodes": nodes, "--speeds": speeds, **swarm_only}
    stray = [flag for flag, value in given.items() if value is not None]
    if stray:
        mode = "with --predict" + (" --swarm" if swarm else "") if predict else "without --predict"
        raise typer.BadParameter(f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply {mode}")
    try:
        reader = open_gguf(model)
        if predict and swarm:
            _predict_swarm(reader, model, n_ctx, _cluster(url, api_key, config), as_json)
            return
        if predict:
            budget = _size(memory_budget) or default_memory_budget()
            _predict(reader, model, n_ctx, max_nodes or 8, budget, link or "wired", as_json)
            return
        nodes = nodes or 2
        plan = plan_for(reader, model, _nodes(nodes, speeds, _free_ram() // nodes), n_ctx)
    except PotluckError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"plan_id": plan.plan_id, **plan.to_dict()}, indent=2))


def _cluster(url: str | None, api_key: str | None, config: Path | None) -> dict[str, Any]:
    from potluck.cli.client import ClientError, get_json
    from potluck.cli.common import api_url, client_api_key, fail, settings_or_exit

    settings = settings_or_exit(config)
    try:
        return get_json(api_url(settings, url) + "/api/cluster", api_key=client_api_key(settings, api_key))
    except ClientError as exc:
        raise fail(f"{exc} (--swarm needs a running node: `potluck node start`, or --url)") from exc


def _predict_swarm(reader: Any, model: Path, n_ctx: int, view: dict[str, Any], as_json: bool) -> None:
    """The forecasts the node's planner would make for ``model`` over the peers in ``view``."""
    from pydantic import ValidationError
    from rich.table import Table

    from potluck.overlay.state import Hardware
    from potluck.overlay.tp_swarm import TpPeer
    from potluck.sharding.orchestration.forecast import ModelSizes, pick
    from potluck.sharding.orchestration.selection import Candidate, forecast_groups, rank_candidates

    def candidate(peer: dict[str, Any]) -> Candidate:
        """A cluster-view entry as the node's selector sees it (the record's schema, then the same
        conversion as ``OverlaySwarmPort.candidates``)."""
        rtt = peer.get("rtt_ms")
        try:
            hw = Hardware.model_validate(peer["hardware"])
        except (KeyError, ValidationError) as exc:
            raise PotluckError(f"the node's cluster view has a malformed peer entry: {exc}") from exc
        return Candidate.of(TpPeer.of(peer["peer_id"], hw, None if rtt is None else rtt / 1e3))

    peers = view.get("peers", [])
    me = next((candidate(p) for p in peers if p.get("self")), None)
    if me is None:
        raise PotluckError("the node's cluster view does not list the node itself")
    others = rank_candidates([candidate(p) for p in peers if not p.get("self")])
    rows = forecast_groups(ModelSizes.of(reader, model, n_ctx), me, others)
    best = pick(rows)
    if as_json:
        groups = [r.to_dict() for r in rows]
        typer.echo(json.dumps({"groups": groups, "pick": None if best is None else best.nodes}))
        return
    table = Table(title=f"{model.name} over the swarm of {me.peer_id[-8:]} ({len(others)} other peer(s))")
    for col in ("ranks", "members (resident MiB, window)", "predicted"):
        table.add_column(col, justify="right" if col != "members (resident MiB, window)" else "left")
    for r in rows:
        members = ", ".join(
            f"{name[-8:]} ({(s.window * s.per_layer + s.fixed) / 2**20:.0f}, {s.window}/{s.layers})"
            for name, s in zip(r.members, r.sizings, strict=True)
        )
        verdict = f"{r.s_per_token * 1e3:.1f} ms/token" if r.feasible else "infeasible"
        table.add_row(str(r.nodes), members, verdict + (" <- pick" if r is best else ""))
    console.print(table)
    if best is None:
        console.print("no group is feasible: " + "; ".join(r.short for r in rows if r.short))
        return
    console.print(
        f"Pick: {best.nodes} rank(s), the fewest within 5 % of the fastest prediction; the peers are taken "
        "in order of RTT, then speed, then free RAM, as `node start --tensor-parallel 0` does."
    )


def _predict(reader: Any, model: Path, n_ctx: int, max_nodes: int, budget: int, link: str, as_json: bool) -> None:
    from rich.table import Table

    from potluck.sharding.orchestration import forecast as fc

    if link not in fc.LINKS:
        raise typer.BadParameter(f"--link must be one of {', '.join(fc.LINKS)}")
    with console.status("measuring this device's memory and disk bandwidth"):
        memory_bw, disk_bw = fc.measure_memory_bandwidth(), fc.measure_disk_bandwidth(model)
    rows = fc.forecast(reader, model, n_ctx, budget, memory_bw, disk_bw, fc.LINKS[link], max_nodes)
    best = fc.pick(rows)
    assert best is not None  # forecast() returns feasible groups only, at least one
    if as_json:
        out = {
            "memory_bw": memory_bw,
            "disk_bw": disk_bw,
            "budget": budget,
            "link": link,
            "groups": [r.to_dict() for r in rows],
            "pick": best.nodes,
        }
        typer.echo(json.dumps(out))
        return
    table = Table(title=f"{model.name}: {budget / 2**20:.0f} MiB budget per device, {link} link")
    for col in ("devices", "resident layers", "largest share", "predicted"):
        table.add_column(col, justify="right")
    for r in rows:
        mark = " <- pick" if r is best else ""
        table.add_row(
            str(r.nodes), f"{r.window}/{r.layers}", f"{r.rank_mib:.1f} MiB", f"{r.s_per_token * 1e3:.1f} ms/token{mark}"
        )
    console.print(table)
    why = (
        "every rank holds its whole share"
        if best.window == best.layers
        else f"{best.window} of {best.layers} layers resident"
    )
    console.print(
        f"measured: memory {memory_bw / 1e9:.1f} GB/s, disk {disk_bw / 1e9:.2f} GB/s. Pick: {best.nodes} device(s), "
        f"{best.s_per_token * 1e3:.1f} ms/token ({why}), the fewest within 5 % of the fastest; more devices "
        "stream less but add 2 all-reduces per layer."
    )


@shard_app.command("generate")
def generate_cmd(
    model: ModelOpt,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text.")],
    nodes: NodesOpt = 1,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0)] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 40,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")] = None,
    n_ctx: Annotated[int | None, typer.Option("--ctx", min=16, help="Context (default: the model's, <= 2048).")] = None,
    speeds: SpeedsOpt = None,
    shard_dir: Annotated[Path | None, typer.Option("--shard-dir", help="Worker shard cache.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="All-reduce deadline (s).")] = 10.0,
    accuracy_level: AccuracyOpt = 4,
    memory_budget: BudgetOpt = None,
    attention: AttentionOpt = Attention.exact,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"tokens": [...], "text": ...}.')] = False,
) -> None:
    """Generate with a master plus N-1 worker processes on this machine over the TCP star."""
    from potluck.routing.request import SamplingParams
    from potluck.sharding.format.gguf_tensors import open_gguf, read_config
    from potluck.sharding.format.tokenizer import GGUFTokenizer
    from potluck.sharding.orchestration.group import generate_ids

    try:
        config = read_config(open_gguf(model))
        ctx = n_ctx or min(config.context_length, 2048)
        tok = GGUFTokenizer(model)
        ids = tok.tokenize(prompt)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple(stop or ()),
        )
        tokens: list[int] = []
        group_args = (model, nodes, speeds, ctx, shard_dir, timeout, accuracy_level, memory_budget, attention)
        with _process_group(*group_args) as group:
            for token in generate_ids(group, ids, params, tok.eog_ids):
                tokens.append(token)
                if params.stop and any(s in tok.detokenize(tokens) for s in params.stop):
                    break
        text = tok.detokenize(tokens)
        if params.stop:
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            text = text if cut < 0 else text[:cut]
    except PotluckError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps({"tokens": tokens, "text": text}))
    else:
        typer.echo(text)


@shard_app.command("perplexity")
def perplexity_cmd(
    model: ModelOpt,
    file: Annotated[Path, typer.Option("--file", "-f", help="Text to score.", exists=True, dir_okay=False)],
    nodes: NodesOpt = 1,
    n_ctx: Annotated[int, typer.Option("--ctx", min=2, help="Window: tokens scored from the file's start.")] = 512,
    speeds: SpeedsOpt = None,
    shard_dir: Annotated[Path | None, typer.Option("--shard-dir", help="Worker shard cache.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="All-reduce deadline (s).")] = 30.0,
    accuracy_level: AccuracyOpt = 4,
    memory_budget: BudgetOpt = None,
    attention: AttentionOpt = Attention.exact,
    threads: Annotated[int, typer.Option("--threads", min=1, help="llama.cpp threads for the reference.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Perplexity of the TP engine with N ranks beside llama.cpp's on the same GGUF and window.

    Scores every token after the first in one window of --ctx tokens from the file's start
    (BOS prepended when the model adds one), and prints both perplexities, their ratio and the
    top-1 agreement of the two engines.
    """
    from potluck.sharding.format.tokenizer import GGUFTokenizer
    from potluck.sharding.orchestration import perplexity

    try:
        text = file.read_text(encoding="utf-8", errors="replace")
        tok = GGUFTokenizer(model)
        try:
            ids = perplexity.window_ids(lambda t: tok.tokenize(t, add_bos=True), text, n_ctx)
        finally:
            tok.close()
        with console.status(f"scoring {n_ctx} tokens with the TP engine at N = {nodes}"):
            group_args = (model, nodes, speeds, n_ctx, shard_dir, timeout, accuracy_level, memory_budget, attention)
            with _process_group(*group_args) as group:
                master = group.master
                tp = perplexity.score_tp(lambda chunk, pos: master.forward(chunk, pos, all_logits=True), ids)
        with console.status("scoring the same window with llama.cpp"):
            reference = perplexity.score_llama_cpp(model, ids, threads)
        report = perplexity.compare(model, nodes, tp, reference)
    except PotluckError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    typer.echo(
        f"{report.model}: {report.n_tokens} tokens, N = {nodes}\n"
        f"  TP engine  perplexity {report.tp_perplexity:.4f}\n"
        f"  llama.cpp  perplexity {report.llama_cpp_perplexity:.4f}\n"
        f"  ratio {report.ratio:.4f}   top-1 agreement {report.top1_agreement:.4f}"
    )
