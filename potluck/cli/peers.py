"""``potluck peers``: the swarm as a running node sees it (from its ``GET /api/cluster``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

peers_app = typer.Typer(help="Show the peers of the swarm a running node is in.")
out = Console()
err = Console(stderr=True)


def _fmt_models(models: list[dict[str, Any]]) -> str:
    return ", ".join(f"{m['id']} ({m['quantization']})" for m in models) or "-"


def _fmt_path(conn: dict[str, Any] | None, is_self: bool) -> str:
    """How the node reaches the peer (NAT traversal): direct, hole-punched, or relayed via <relay>."""
    if is_self:
        return "-"
    if not conn:
        return "not connected"
    if conn["kind"] == "relayed":
        return f"relayed via {conn['relay']}"
    return str(conn["kind"])


def _fmt_verification(v: dict[str, Any] | None, is_self: bool) -> str:
    """Serving-quality standing (issue 14): EXCLUDED and why, or the reputation and last verdict."""
    if is_self or not v:
        return "-"
    if v.get("excluded"):
        return f"EXCLUDED: {v['excluded']}"
    last = v.get("last")
    head = f"rep {v['reputation']:.2f} ({v['passes']} pass, {v['fails']} fail)"
    return head if not last else f"{head}; last {last['method']} {last['verdict']}"


def peers_table(view: dict[str, Any]) -> Table:
    """A rich table of ``GET /api/cluster``: peer ID, addrs, models, load, RTT, tier, last seen."""
    table = Table(title=f"swarm {view['swarm']!r} seen from {view['peer_id']}")
    for col in ("peer ID", "addrs", "models", "load", "RTT", "path", "trust tier", "verification", "last seen"):
        table.add_column(col, overflow="fold")
    for p in view["peers"]:
        load = p["load"]
        rtt = "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f} ms"
        seen = "this node" if p["self"] else ("-" if p["last_seen_s"] is None else f"{p['last_seen_s']:.0f} s ago")
        table.add_row(
            p["peer_id"],
            "\n".join(p["addrs"]) or "-",
            _fmt_models(p["models"]),
            f"queue {load['queue_depth']}, active {load['active']}",
            rtt,
            _fmt_path(p.get("connection"), p["self"]),
            str(p["trust_tier"]),
            _fmt_verification(p.get("verification"), p["self"]),
            seen,
        )
    return table


@peers_app.callback(invoke_without_command=True)
def peers(
    url: Annotated[str | None, typer.Option("--url", help="Node API base URL (default: from settings).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw view as JSON.")] = False,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Key to send (default: POTLUCK_API_KEY or config).")
    ] = None,
) -> None:
    """List the peers in the swarm: peer ID, addrs, models, load, RTT, trust tier, verification, last seen."""
    from potluck.cli.client import ClientError, get_json
    from potluck.cli.common import api_url, client_api_key, fail, settings_or_exit

    settings = settings_or_exit(config)
    try:
        view = get_json(api_url(settings, url) + "/api/cluster", api_key=client_api_key(settings, api_key))
    except ClientError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        out.print_json(json.dumps(view))
        return
    out.print(peers_table(view))
