"""``potluck privacy``: preview sanitization (``redact``) and read the audit log (``audit``)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from potluck.errors import PotluckError

privacy_app = typer.Typer(help="Preview sanitization and read the privacy audit log.", no_args_is_help=True)
_err = Console(stderr=True)
_out = Console()


def _redact_one(sanitizer: Any, text: str) -> dict[str, Any]:
    result = sanitizer.sanitize([text])
    sanitized = result.texts[0]
    return {
        "text": text,
        "sanitized": sanitized,
        "entities": [
            {"type": r.entity_type, "start": r.start, "end": r.end, "placeholder": r.placeholder}
            for r in result.replacements[0]
        ],
        "restored": result.restorer().restore(sanitized),
    }


@privacy_app.command("redact")
def redact(
    jsonl: Annotated[bool, typer.Option("--jsonl", help='Read JSON lines {"text": ...}, one result per line.')] = False,
) -> None:
    """Sanitize stdin and write {"text", "sanitized", "entities", "restored"} as JSON (one line per input).

    Without --jsonl all of stdin is one text. Offsets are Python string indices into "text".
    """
    logging.basicConfig(level=logging.ERROR)
    from potluck.privacy.sanitizer import Sanitizer

    try:
        sanitizer = Sanitizer()
    except PotluckError as exc:
        _err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    failures = 0
    write = sys.stdout.write
    if not jsonl:
        write(json.dumps(_redact_one(sanitizer, sys.stdin.read()), ensure_ascii=False) + "\n")
        return
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError('expected an object with a string "text"')
            write(json.dumps(_redact_one(sanitizer, obj["text"]), ensure_ascii=False) + "\n")
        except ValueError as exc:  # json.JSONDecodeError included
            failures += 1
            write(json.dumps({"line": n, "error": str(exc)}) + "\n")
            _err.print(f"[bold red]line {n}:[/] {exc}")
        except PotluckError as exc:
            failures += 1
            write(json.dumps({"line": n, "error": str(exc)}) + "\n")
            _err.print(f"[bold red]line {n}:[/] {exc}")
    if failures:
        raise typer.Exit(1)


@privacy_app.command("audit")
def audit(
    limit: Annotated[int, typer.Option("--limit", "-n", help="Show the last N records (0: all).")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Node state directory.")] = None,
) -> None:
    """Show what left this node: destination, tier, entity counts, hash of the sanitized text."""
    from dataclasses import asdict

    from potluck.config import load_settings
    from potluck.privacy.audit import AuditLog

    try:
        settings = load_settings(config, data_dir=data_dir)
    except PotluckError as exc:
        _err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    log = AuditLog.in_data_dir(settings.data_dir)
    records = list(log.records())
    if limit > 0:
        records = records[-limit:]
    if as_json:
        for r in records:
            sys.stdout.write(json.dumps(asdict(r), sort_keys=True) + "\n")
        return
    if not records:
        _out.print(f"no outbound requests recorded in {log.path}")
        return
    table = Table("time", "destination", "tier", "level", "action", "entities", "sha256 (sent text)")
    for r in records:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r.entities.items())) or "-"
        table.add_row(r.time[:19], r.destination, str(r.tier), r.level, r.action, counts, r.sanitized_sha256[:16])
    _out.print(table)
