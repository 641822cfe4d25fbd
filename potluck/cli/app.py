"""The ``potluck`` command line: one typer app, one module per command group.

Groups: ``node`` (:mod:`.node`), ``chat`` (:mod:`.chat`), ``status`` (:mod:`.node`), ``models``
(:mod:`.models`), ``peers`` (:mod:`.peers`), ``shard`` (:mod:`.shard`), ``privacy``
(:mod:`.privacy`). Settings flow: flags > ``POTLUCK_*`` env > config file > defaults
(:func:`potluck.config.load_settings`). The CLI talks to a running node over HTTP
(:mod:`.client`); only ``node start`` and the offline tools (``shard``, ``privacy redact``)
import the subsystems, and only inside the command.
"""

from __future__ import annotations

import sys

import typer

from potluck.cli.chat import chat
from potluck.cli.models import models_app
from potluck.cli.node import node_app, status
from potluck.cli.peers import peers_app
from potluck.cli.privacy import privacy_app
from potluck.cli.route import route_app
from potluck.cli.shard import shard_app

app = typer.Typer(help="potluck: run LLMs on the devices you already own, together.", no_args_is_help=True)
app.add_typer(node_app, name="node")
app.add_typer(models_app, name="models")
app.add_typer(peers_app, name="peers")
app.add_typer(shard_app, name="shard")
app.add_typer(privacy_app, name="privacy")
app.add_typer(route_app, name="route")
app.command()(chat)
app.command()(status)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
