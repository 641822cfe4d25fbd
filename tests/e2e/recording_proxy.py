"""A recording reverse proxy in front of a real OpenAI-compatible server (the stand-in "cloud").

    python -m tests.e2e.recording_proxy --port P --upstream http://127.0.0.1:U --record FILE

* Every request body that arrives is appended to ``FILE`` (JSON lines), before forwarding: this is
  exactly what the cloud would see.
* Responses are forwarded unchanged, except that a streamed chat completion gets extra content
  chunks in front of the upstream's own: ``"ECHO "`` followed by each typed placeholder found in
  the request, split across SSE events in the middle of the placeholder, once in canonical form
  and once as a model might write it (``<person_1>``). The fixture model is a character-level
  Shakespeare model and never writes placeholders itself; this is how the test makes the reply
  carry them, so that the node's restoration is exercised on a real SSE stream.
"""

from __future__ import annotations

import argparse
import json
import re

import aiohttp
from aiohttp import web

PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]*_\d+>")


def _chunk(model: str, text: str) -> bytes:
    event = {
        "id": "chatcmpl-proxy",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _echo_pieces(body: dict) -> list[str]:
    text = json.dumps(body.get("messages", body.get("prompt", "")))
    found = list(dict.fromkeys(PLACEHOLDER.findall(text)))
    pieces = ["ECHO "]
    for ph in found:
        half = len(ph) // 2
        pieces += [ph[:half], ph[half:] + " ", ph.lower()[:3], ph.lower()[3:] + " "]
    return pieces


async def handle(request: web.Request) -> web.StreamResponse:
    upstream: str = request.app["upstream"]
    raw = await request.read()
    line = json.dumps({"path": request.path, "method": request.method, "body": raw.decode("utf-8", "replace")})
    with open(request.app["record"], "a", encoding="utf-8") as fh:  # noqa: ASYNC230 - tiny, test-only
        fh.write(line + "\n")
    session: aiohttp.ClientSession = request.app["session"]
    async with session.request(
        request.method, upstream + request.path_qs, data=raw or None, headers={"Content-Type": "application/json"}
    ) as resp:
        if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
            return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)
        out = web.StreamResponse(status=resp.status, headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        body = json.loads(raw) if raw else {}
        if request.path.endswith("/chat/completions"):
            for piece in _echo_pieces(body):
                await out.write(_chunk(str(body.get("model")), piece))
        async for line in resp.content:
            await out.write(line)
        await out.write_eof()
        return out


async def _session_ctx(app: web.Application):
    app["session"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
    yield
    await app["session"].close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--record", required=True)
    args = ap.parse_args()
    app = web.Application()
    app["upstream"] = args.upstream.rstrip("/")
    app["record"] = args.record
    app.cleanup_ctx.append(_session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
