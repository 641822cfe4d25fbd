"""``potluck node start`` as a real process, called through curl and the official openai client."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import openai
import pytest

from tests.e2e.procs import POTLUCK, NodeProcess, offline_env, until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node(tmp_path_factory, model_path):
    with NodeProcess(tmp_path_factory.mktemp("node"), "--model", str(model_path("q4_0"))) as proc:
        proc.wait_ready()
        yield proc


def test_openai_client_chat_non_streaming_and_streaming(node):
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="unused")
    models = client.models.list()
    model = models.data[0].id
    assert model == "tinyshakespeare-q4_0"
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "ROMEO:"}], max_tokens=24)
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "ROMEO:"}], max_tokens=24, stream=True
        )
        if chunk.choices
    ]
    assert "".join(pieces).strip()
    completion = client.completions.create(model=model, prompt="JULIET:", max_tokens=10, temperature=0)
    assert completion.choices[0].text


@pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (apt-get install curl; .ci/run installs it)"
)
def test_curl_streaming_and_non_streaming(node):
    body = json.dumps({"messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 16})
    out = subprocess.run(
        ["curl", "-sS", node.url + "/v1/chat/completions", "-H", "Content-Type: application/json", "-d", body],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert json.loads(out)["choices"][0]["message"]["content"].strip()
    stream_body = json.dumps({"messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 16, "stream": True})
    out = subprocess.run(
        ["curl", "-sSN", node.url + "/v1/chat/completions", "-H", "Content-Type: application/json", "-d", stream_body],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text.strip()


def test_cli_chat_and_status(node, tmp_path):
    env = offline_env(tmp_path)
    chat = subprocess.run(
        [*POTLUCK, "chat", "ROMEO:", "--url", node.url, "--max-tokens", "12"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
    status = subprocess.run(
        [*POTLUCK, "status", "--url", node.url, "--json"], capture_output=True, text=True, timeout=60, env=env
    )
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["peer_id"].startswith("12D3KooW") and info["models"][0]["model_id"] == "tinyshakespeare-q4_0"


def test_cli_chat_without_a_node_says_what_to_do(tmp_path):
    chat = subprocess.run(
        [*POTLUCK, "chat", "hi", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        env=offline_env(tmp_path),
    )
    assert chat.returncode == 1 and "potluck node start" in chat.stderr


def test_no_model_no_network_serves_demo_model_and_exits_cleanly_on_sigterm(tmp_path):
    with NodeProcess(tmp_path / "demo") as proc:
        proc.wait_ready()
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="potluck-demo-v1", messages=[{"role": "user", "content": "hello"}], max_tokens=16
        )
        assert reply.choices[0].message.content
        assert proc.stop(signal.SIGTERM) == 0
    out = "".join(proc.output().split())
    assert "RANDOM" in out and "--model" in out  # the demo-model warning says how to pass a real model
    assert "12D3KooW" in out  # peer ID printed at start-up


def test_corrupt_model_exits_with_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 64)
    with NodeProcess(tmp_path / "bad", "--model", str(bad)) as proc:
        assert proc.proc.wait(60) == 1
    flat = "".join(proc.output().split())  # rich wraps long lines
    assert "broken.gguf" in flat and "downloaditagain" in flat


def test_sigint_mid_stream_exits_zero(tmp_path):
    with NodeProcess(tmp_path / "sig") as proc:
        proc.wait_ready()
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="potluck-demo-v1", prompt="x", max_tokens=1500, stream=True)
        next(iter(stream))
        assert proc.stop(signal.SIGINT) == 0


def test_ctrl_c_while_the_model_is_still_loading_exits_cleanly(tmp_path, model_path):
    """SIGINT right after llama.cpp has read the weights, while the batched context is still being
    built: shutdown waits for the load thread instead of freeing the model under it (this was a
    segfault, exit -11, in 4 of 4 tries before the fix)."""
    proc = NodeProcess(tmp_path, "--model", str(model_path("q4_0")))
    try:
        until(lambda: "loaded tinyshakespeare" in proc.output(), 60, "llama.cpp to read the weights", interval=0.02)
        assert proc.stop(signal.SIGINT) == 0, proc.output()
    finally:
        proc.stop()
