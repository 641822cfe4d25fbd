"""Issue 12 through a forwarded peer route: two real ``potluck node start`` processes, the client
asks the node that does *not* serve SmolLM2, which forwards over RPC ``generate`` to the peer that
does. ``response_format`` (a grammar on the wire), ``logprobs`` and a forced tool call must be
honoured there, exactly as locally, through the official ``openai`` client."""

from __future__ import annotations

import json
import os
import subprocess

import jsonschema
import pytest
from openai import OpenAI, PermissionDeniedError

from tests.conftest import SHARED
from tests.e2e.procs import NodeProcess, free_port, get_json, swarm_env
from tests.helpers import until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SMOL = "smol"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
}


def smollm2() -> str:
    out = subprocess.run([str(SHARED / "scripts" / "real-models")], capture_output=True, text=True, check=True).stdout
    return dict(line.split(maxsplit=1) for line in out.splitlines() if line.strip())["smollm2-q4_1"].strip()


@pytest.fixture(scope="module")
def pair(tmp_path_factory, model_path):
    base = tmp_path_factory.mktemp("pair")
    name, port = f"e2e-oa-{os.getpid()}", free_port()
    nodes: list[NodeProcess] = []

    def env(home):
        return swarm_env(home, name, "potluck-e2e-secret", "0", POTLUCK_ANTI_ENTROPY_INTERVAL_S="3")

    try:
        boot = NodeProcess(base / "a", "-m", str(model_path("q4_0")), "--p2p-port", str(port), env=env(base / "a"))
        nodes.append(boot)
        boot.wait_ready()
        addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{get_json(boot.url + '/api/node')['peer_id']}"
        peer_env = {**env(base / "b"), "POTLUCK_MODEL_NAME": SMOL}
        peer = NodeProcess(base / "b", "-m", smollm2(), "--bootstrap", addr, env=peer_env)
        nodes.append(peer)
        peer.wait_ready()
        until(
            lambda: SMOL in {m["id"] for m in get_json(boot.url + "/v1/models")["data"]}, 120, what="the peer's model"
        )
        yield boot, peer
    finally:
        for n in nodes:
            n.stop()


def test_forwarded_route_honours_response_format_logprobs_and_tools(pair):
    boot, _ = pair
    c = OpenAI(base_url=boot.url + "/v1", api_key="none", max_retries=0, timeout=120)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    r = c.with_raw_response.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Name a big city."}],
        response_format=fmt,
        max_tokens=128,
        temperature=0,
    )
    assert r.headers["x-potluck-route"] != "local"
    jsonschema.validate(json.loads(r.parse().choices[0].message.content), SCHEMA)

    stream = c.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Name a big city."}],
        response_format=fmt,
        max_tokens=128,
        temperature=0,
        stream=True,
        logprobs=True,
        top_logprobs=2,
    )
    text, lps = "", []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            lps += chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else []
    jsonschema.validate(json.loads(text), SCHEMA)
    assert "".join(t.token for t in lps) == text and all(len(t.top_logprobs) == 2 for t in lps)

    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    # Tool definitions and call arguments are not sanitized: a community peer gets them only unsanitized.
    with pytest.raises(PermissionDeniedError):
        c.chat.completions.create(model=SMOL, messages=ask, tools=[tool], tool_choice="required")
    off = {"X-Potluck-Privacy": "off"}
    r = c.chat.completions.create(model=SMOL, messages=ask, tools=[tool], tool_choice="required", extra_headers=off)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
