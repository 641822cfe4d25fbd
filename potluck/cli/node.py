"""``potluck node start`` and ``potluck status``: run a node, and ask a running one how it is."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from potluck.cli.common import ConfigOpt, DataDirOpt, UrlOpt, api_url, fail, out, settings_or_exit, setup_logging
from potluck.config import DEFAULT_PORT
from potluck.errors import PotluckError

node_app = typer.Typer(help="Run a potluck node.", no_args_is_help=True)


@node_app.command("start")
def node_start(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="GGUF path or Hugging Face 'owner/repo:file.gguf'.")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", help=f"HTTP port (default {DEFAULT_PORT}).")] = None,
    backend: Annotated[
        str | None, typer.Option("--backend", help="Inference backend: llama.cpp or onnxruntime.")
    ] = None,
    n_ctx: Annotated[int | None, typer.Option("--ctx", help="Context length in tokens.")] = None,
    max_queue: Annotated[int | None, typer.Option("--max-queue", help="Queued requests before 429.")] = None,
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
            help="Serve the model tensor-parallel across N swarm nodes (0: only if it does not fit here).",
        ),
    ] = None,
    tp_worker: Annotated[
        bool | None, typer.Option("--tp-worker/--no-tp-worker", help="Accept tensor-parallel work from peers.")
    ] = None,
    tp_transport: Annotated[
        str | None, typer.Option("--tp-transport", help="Star all-reduce path: auto, tcp or libp2p.")
    ] = None,
) -> None:
    """Start a node: load a model and serve the OpenAI-compatible API until Ctrl-C."""
    settings = settings_or_exit(
        config,
        model=model,
        host=host,
        port=port,
        backend=backend,
        n_ctx=n_ctx,
        max_queue=max_queue,
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
    )
    setup_logging(settings.log_level)
    from potluck.node.daemon import run_node

    try:
        run_node(settings)
    except PotluckError as exc:
        raise fail(str(exc)) from exc


def status(url: UrlOpt = None, config: ConfigOpt = None, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a running node's peer ID, model and uptime."""
    from potluck.cli.client import ClientError, get_json

    settings = settings_or_exit(config)
    try:
        info = get_json(api_url(settings, url) + "/api/node")
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
