"""``potluck node start`` and ``potluck status``: run a node, and ask a running one how it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from potluck.cli.common import (
    ApiKeyOpt,
    ConfigOpt,
    DataDirOpt,
    UrlOpt,
    api_url,
    client_api_key,
    fail,
    out,
    settings_or_exit,
    setup_logging,
)
from potluck.config import DEFAULT_PORT
from potluck.errors import PotluckError

node_app = typer.Typer(help="Run a potluck node.", no_args_is_help=True)


@node_app.command("start")
def node_start(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="GGUF path or Hugging Face 'owner/repo:file.gguf'.")
    ] = None,
    embedding_model: Annotated[
        str | None,
        typer.Option("--embedding-model", help="GGUF (path or 'owner/repo:file.gguf') served on /v1/embeddings."),
    ] = None,
    alias: Annotated[
        list[str] | None,
        typer.Option("--alias", help="Another name for a model, NAME=MODEL, e.g. gpt-4o-mini=SmolLM2 (repeatable)."),
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", help=f"HTTP port (default {DEFAULT_PORT}).")] = None,
    backend: Annotated[
        str | None, typer.Option("--backend", help="Inference backend: llama.cpp or onnxruntime.")
    ] = None,
    n_ctx: Annotated[int | None, typer.Option("--ctx", help="Context length in tokens.")] = None,
    max_queue: Annotated[int | None, typer.Option("--max-queue", help="Queued requests before 429.")] = None,
    parallel: Annotated[
        int | None, typer.Option("--parallel", min=1, max=64, help="Requests decoded together in one batch.")
    ] = None,
    n_threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Compute threads (default: the free cores, adaptive).")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="debug, info, warning, error.")] = None,
    bootstrap: Annotated[
        list[str] | None, typer.Option("--bootstrap", help="Peer multiaddr to join through (repeatable).")
    ] = None,
    swarm: Annotated[str | None, typer.Option("--swarm", help="Swarm name.")] = None,
    swarm_secret: Annotated[
        str | None, typer.Option("--swarm-secret", help="Secret of a private swarm.", envvar=None)
    ] = None,
    p2p_port: Annotated[int | None, typer.Option("--p2p-port", help="libp2p TCP port (0: any free).")] = None,
    relay: Annotated[
        bool | None, typer.Option("--relay/--no-relay", help="Volunteer as a circuit relay for peers behind NAT.")
    ] = None,
    privacy: Annotated[str | None, typer.Option("--privacy", help="strict, standard or off.")] = None,
    cloud_url: Annotated[
        str | None, typer.Option("--cloud-url", help="OpenAI-compatible upstream base URL (models: cloud/<name>).")
    ] = None,
    cloud_model: Annotated[
        list[str] | None, typer.Option("--cloud-model", help="Upstream model to offer (repeatable).")
    ] = None,
    tensor_parallel: Annotated[
        int | None,
        typer.Option(
            "--tensor-parallel",
            min=0,
            max=64,
            help="Serve the model tensor-parallel across N swarm nodes (0: only if it does not fit this "
            "node's --memory-budget or free RAM, with N chosen by the cost model).",
        ),
    ] = None,
    tp_worker: Annotated[
        bool | None, typer.Option("--tp-worker/--no-tp-worker", help="Accept tensor-parallel work from peers.")
    ] = None,
    tp_transport: Annotated[
        str | None, typer.Option("--tp-transport", help="Star all-reduce path: auto, tcp or libp2p.")
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            "--memory-budget",
            help="Resident memory for a tensor-parallel rank (e.g. 2GiB); over it, a sliding window of layers.",
        ),
    ] = None,
    api_keys: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            help="API key clients must send (repeatable): 'KEY [scopes=cloud,privacy-override] [rate=60/min]'.",
        ),
    ] = None,
    api_keys_file: Annotated[
        Path | None, typer.Option("--api-keys-file", help="File of API keys, one a line; re-read on change.")
    ] = None,
    no_auth: Annotated[
        bool | None, typer.Option("--no-auth", help="Serve a non-loopback --host without API keys.")
    ] = None,
    api_rate_limit: Annotated[
        str | None, typer.Option("--api-rate-limit", help="Requests per key without its own rate=, e.g. 60/min.")
    ] = None,
) -> None:
    """Start a node: load a model and serve the OpenAI-compatible API until Ctrl-C."""
    settings = settings_or_exit(
        config,
        model=model,
        embedding_model=embedding_model,
        aliases=parse_aliases(alias) if alias else None,
        host=host,
        port=port,
        backend=backend,
        n_ctx=n_ctx,
        max_queue=max_queue,
        parallel=parallel,
        n_threads=n_threads,
        data_dir=data_dir,
        log_level=log_level,
        bootstrap=bootstrap or None,
        swarm=swarm,
        swarm_secret=swarm_secret,
        p2p_port=p2p_port,
        relay=relay,
        privacy=privacy,
        cloud_url=cloud_url,
        cloud_model=cloud_model or None,
        tensor_parallel=tensor_parallel,
        tp_worker=tp_worker,
        tp_transport=tp_transport,
        memory_budget=memory_budget,
        api_keys=api_keys or None,
        api_keys_file=api_keys_file,
        no_auth=no_auth,
        api_rate_limit=api_rate_limit,
    )
    setup_logging(settings.log_level)
    from potluck.node.daemon import run_node

    try:
        run_node(settings)
    except PotluckError as exc:
        raise fail(str(exc)) from exc


def parse_aliases(specs: list[str]) -> dict[str, str]:
    """``["gpt-4o-mini=SmolLM2-135M-Instruct", ...]`` -> ``{"gpt-4o-mini": "SmolLM2-135M-Instruct"}``.

    Raises:
        typer.Exit: a spec is not ``NAME=MODEL`` with both sides non-empty.
    """
    aliases: dict[str, str] = {}
    for spec in specs:
        name, sep, target = (part.strip() for part in spec.partition("="))
        if not (sep and name and target):
            raise fail(f"--alias {spec!r}: expected NAME=MODEL, e.g. --alias gpt-4o-mini=SmolLM2-135M-Instruct")
        aliases[name] = target
    return aliases


def status(
    url: UrlOpt = None,
    config: ConfigOpt = None,
    as_json: bool = typer.Option(False, "--json"),
    api_key: ApiKeyOpt = None,
) -> None:
    """Show a running node's peer ID, model and uptime."""
    from potluck.cli.client import ClientError, get_json

    settings = settings_or_exit(config)
    try:
        info = get_json(api_url(settings, url) + "/api/node", api_key=client_api_key(settings, api_key))
    except ClientError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(show_header=False, box=None)
    table.add_row("peer ID", info["peer_id"])
    table.add_row("version", info["version"])
    table.add_row("uptime", f"{info['uptime_s']:.0f} s")
    for m in info["models"]:
        table.add_row(
            "model",
            f"{m['model_id']} ({m['architecture']}, {m['quantization']}, {m['n_layers']} layers, "
            f"{m['n_params'] / 1e6:.1f} M params, ctx {m['n_ctx']})",
        )
    table.add_row("queue", str(info["queue_depth"]))
    out.print(table)
