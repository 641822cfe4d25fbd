"""``potluck chat``: ask a running node and stream its answer."""

from __future__ import annotations

from typing import Annotated

import typer

from potluck.cli.common import ApiKeyOpt, ConfigOpt, UrlOpt, api_url, client_api_key, fail, out, settings_or_exit


def chat(
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model id (default: the node's).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature.")] = 0.8,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    url: UrlOpt = None,
    config: ConfigOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Ask a running node and stream its answer."""
    from potluck.cli.client import ClientError, stream_chat

    settings = settings_or_exit(config)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        key = client_api_key(settings, api_key)
        for piece in stream_chat(api_url(settings, url), messages, model, max_tokens, temperature, key):
            out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        out.print()
    except ClientError as exc:
        raise fail(str(exc)) from exc
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
