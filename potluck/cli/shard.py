"""``potluck shard ...``: plan a tensor-parallel split and generate with N local processes."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from potluck.errors import PotluckError

shard_app = typer.Typer(help="Tensor parallelism: plan shards, generate across worker processes.", no_args_is_help=True)
console = Console(stderr=True)
log = logging.getLogger(__name__)

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="GGUF file.", exists=True, dir_okay=False)]
NodesOpt = Annotated[int, typer.Option("--nodes", "-n", min=1, max=64, help="Ranks (master + N-1 workers).")]
SpeedsOpt = Annotated[
    str | None, typer.Option("--speeds", help="Comma-separated relative speeds per rank (default: equal).")
]


def _nodes(n: int, speeds: str | None, ram_bytes: int):
    from potluck.sharding.format.plan import NodeCapability

    values = [float(s) for s in speeds.split(",")] if speeds else [1.0] * n
    if len(values) != n:
        raise typer.BadParameter(f"--speeds needs {n} values")
    return [NodeCapability(f"local-{r}", ram_bytes, v) for r, v in enumerate(values)]


def _free_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


@shard_app.command("plan")
def plan_cmd(
    model: ModelOpt,
    nodes: NodesOpt = 2,
    speeds: SpeedsOpt = None,
    n_ctx: Annotated[int, typer.Option("--ctx", min=16, help="KV-cache tokens per rank.")] = 2048,
) -> None:
    """Print the shard plan (JSON) for N equal-memory nodes."""
    from potluck.sharding.format.gguf_tensors import open_gguf
    from potluck.sharding.orchestration.group import plan_for

    try:
        plan = plan_for(open_gguf(model), model, _nodes(nodes, speeds, _free_ram() // nodes), n_ctx)
    except PotluckError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"plan_id": plan.plan_id, **plan.to_dict()}, indent=2))


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
    as_json: Annotated[bool, typer.Option("--json", help='Print {"tokens": [...], "text": ...}.')] = False,
) -> None:
    """Generate with a master plus N-1 worker processes on this machine over the TCP star."""
    from potluck.routing.request import SamplingParams
    from potluck.sharding.compute.engine import EngineOptions
    from potluck.sharding.format.gguf_tensors import open_gguf, read_config
    from potluck.sharding.format.tokenizer import GGUFTokenizer
    from potluck.sharding.orchestration.group import generate_ids
    from potluck.sharding.orchestration.launch import ProcessGroup

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
        tmp = None if shard_dir else tempfile.TemporaryDirectory(prefix="potluck-shards-")
        directory = shard_dir or Path(tmp.name)  # type: ignore[union-attr]
        tokens: list[int] = []
        try:
            with ProcessGroup(
                model,
                _nodes(nodes, speeds, _free_ram() // nodes),
                EngineOptions(n_ctx=ctx),
                directory,
                timeout_s=timeout,
            ) as group:
                for token in generate_ids(group, ids, params, tok.eog_ids):
                    tokens.append(token)
                    if params.stop and any(s in tok.detokenize(tokens) for s in params.stop):
                        break
        finally:
            if tmp is not None:
                tmp.cleanup()
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
