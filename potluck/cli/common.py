"""Shared pieces of the command line: console, option types, settings and error helpers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from potluck.config import Settings, load_settings
from potluck.errors import PotluckError

console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file (default: platformdirs config dir).")
]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Node key and state directory.")]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="Key to send to the node (default: POTLUCK_API_KEY, config api_key, else the first of api_keys).",
    ),
]
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


def client_api_key(settings: Settings, flag: str | None) -> str | None:
    """The key a CLI command sends: ``--api-key``, else ``api_key`` (``POTLUCK_API_KEY``), else the key
    of the first ``api_keys`` entry (the node's own, when both run from one config), else none."""
    if flag:
        return flag
    if settings.api_key is not None:
        return settings.api_key.get_secret_value()
    if settings.api_keys:
        return settings.api_keys[0].get_secret_value().split("#", 1)[0].split()[0]
    return None
