"""``potluck route explain --model M``: how a running node would route a request, and why.

Prints the router's ranked candidates (``GET /api/route/explain``): allowed ones first, best score
first, each with its predicted TTFT and latency, decode speed (and where that figure came from),
queue, RTT, cost and trust term; ruled-out ones with the constraint that ruled them out.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

route_app = typer.Typer(help="Explain how a running node routes requests.")
out = Console()


def explain_table(plan: dict[str, Any]) -> Table:
    """A rich table of ``GET /api/route/explain``."""
    table = Table(title=f"routes for {plan['model']!r} (lower score is better)")
    for col in ("#", "candidate", "tier", "score", "TTFT s", "latency s", "tok/s", "queue", "RTT", "cost", "status"):
        table.add_column(col, overflow="fold")
    for i, c in enumerate(plan["candidates"], 1):
        rtt = "-" if c["rtt_ms"] is None else f"{c['rtt_ms']:.1f} ms"
        status = "allowed" if c["allowed"] else f"ruled out ({c['constraint']}): {c['refused']}"
        table.add_row(
            str(i),
            f"{c['kind']} {c['target']}",
            str(c["tier"]),
            f"{c['score']:.3f}",
            f"{c['predicted_ttft_s']:.3f}",
            f"{c['predicted_latency_s']:.3f}",
            f"{c['tps']:.1f} ({c['tps_source']})",
            str(c["queue"]),
            rtt,
            f"{c['cost']:.6f}" if c["cost"] else "0",
            status,
        )
    return table


@route_app.command("explain")
def explain(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model to route (default: the node's).")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Tokens to predict for.")] = None,
    url: Annotated[str | None, typer.Option("--url", help="Node API base URL (default: from settings).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw plan as JSON.")] = False,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Key to send (default: POTLUCK_API_KEY or config).")
    ] = None,
) -> None:
    """Print the ranked route candidates for a model, with their scores and why any are ruled out."""
    from potluck.cli.client import ClientError, get_json
    from potluck.cli.common import api_url, client_api_key, fail, settings_or_exit

    settings = settings_or_exit(config)
    query = {k: v for k, v in {"model": model, "max_tokens": max_tokens}.items() if v is not None}
    target = api_url(settings, url) + "/api/route/explain?" + urllib.parse.urlencode(query)
    try:
        plan = get_json(target, api_key=client_api_key(settings, api_key))
    except ClientError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        out.print_json(json.dumps(plan))
        return
    out.print(explain_table(plan))
