"""``potluck`` command line: node start, chat, models, status (+ the subsystems' own groups).

Each subsystem that has commands defines a ``typer.Typer`` in ``potluck/<subsystem>/cli.py``
and registers it below. Settings flow: flags > ``POTLUCK_*`` env > config file > defaults
(:func:`potluck.config.load_settings`).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from potluck.config import DEFAULT_PORT, Settings, load_settings
from potluck.errors import PotluckError
from potluck.overlay.cli import peers_app
from potluck.privacy.cli import privacy_app
from potluck.sharding.cli import shard_app

app = typer.Typer(help="potluck: run LLMs on the devices you already own, together.", no_args_is_help=True)
node_app = typer.Typer(help="Run a potluck node.", no_args_is_help=True)
models_app = typer.Typer(help="List and download models.", no_args_is_help=True)
app.add_typer(node_app, name="node")
app.add_typer(models_app, name="models")
# Subsystem command groups register here: app.add_typer(<their app>, name="<group>").
app.add_typer(peers_app, name="peers")
app.add_typer(shard_app, name="shard")
app.add_typer(privacy_app, name="privacy")

console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file (default: platformdirs config dir).")
]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Node key and state directory.")]
UrlOpt = Annotated[
    str | None, typer.Option("--url", help="Node API base URL (default: http://<host>:<port> from settings).")
]


def setup_logging(level: str) -> None:
    """Log through rich to stderr."""
    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error the user can act on and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def settings_or_exit(config: Path | None, **flags: object) -> Settings:
    try:
        return load_settings(config, **flags)
    except PotluckError as exc:
        raise fail(str(exc)) from exc


def api_url(settings: Settings, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}"


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


@app.command()
def chat(
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model id (default: the node's).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature.")] = 0.8,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Ask a running node and stream its answer."""
    from potluck.node.client import ClientError, stream_chat

    settings = settings_or_exit(config)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    try:
        for piece in stream_chat(api_url(settings, url), messages, model, max_tokens, temperature):
            out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        out.print()
    except ClientError as exc:
        raise fail(str(exc)) from exc
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def status(url: UrlOpt = None, config: ConfigOpt = None, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a running node's peer ID, model and uptime."""
    from potluck.node.client import ClientError, get_json

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


@models_app.command("list")
def models_list(config: ConfigOpt = None) -> None:
    """List models in the local cache (downloaded and generated)."""
    from potluck.inference.resolve import cached_models

    settings = settings_or_exit(config)
    table = Table("model", "size", "path")
    for path in cached_models(settings.cache_dir):
        table.add_row(path.name, f"{path.stat().st_size / 1e6:.1f} MB", str(path))
    out.print(table if table.row_count else "no cached models; try `potluck models pull`")


@models_app.command("pull")
def models_pull(
    spec: Annotated[
        str | None, typer.Argument(help="Hugging Face 'owner/repo:file.gguf' (default: the default model).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Download a GGUF model from Hugging Face into the cache, with a progress bar."""
    from potluck.inference.resolve import DEFAULT_MODEL, download

    settings = settings_or_exit(config)
    setup_logging(settings.log_level)
    try:
        path = download(spec or DEFAULT_MODEL, settings.cache_dir)
    except PotluckError as exc:
        raise fail(str(exc)) from exc
    out.print(f"downloaded {path}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
