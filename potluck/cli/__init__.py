"""The ``potluck`` command line (typer + rich). Subsystems never import this package."""

from potluck.cli.app import app, main

__all__ = ["app", "main"]
