"""API keys end to end: real ``potluck node start`` processes, a real second node as the cloud.

Node A listens on 0.0.0.0 with a keys file and offers ``cloud/<model>``; the "cloud" is node B
behind the recording proxy (:mod:`tests.e2e.recording_proxy`, as in ``test_cloud_offload.py``), so
every test can check what reached the upstream. A non-loopback client is a socket opened inside a
network namespace the module creates, joined to this one by a veth pair (A sees the request come
from the namespace's 10.x address); the namespace and both veth ends are deleted at the end.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.procs import POTLUCK, NodeProcess, free_port, offline_env, recording_proxy
from tests.netem.netns import Namespace, delete_namespace, missing_requirements, sh

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(600)]

UPSTREAM_MODEL = "tinyshakespeare-q8_0"
CLOUD_MODEL = f"cloud/{UPSTREAM_MODEL}"
KEYS = {
    "plain": "sk-plain-4f9c2a7e1b3d5f60",
    "cloud": "sk-cloud-8e2b6d4a0c1f3e57",
    "all": "sk-all-1a2b3c4d5e6f7a8b9c",
    "rate": "sk-rate-0f1e2d3c4b5a6978",
    "gone": "sk-gone-9a8b7c6d5e4f3a2b",
}
KEYS_FILE = f"""# potluck API keys (tests/e2e/test_auth.py)
{KEYS["plain"]} name=plain
{KEYS["cloud"]} scopes=cloud name=cloud
{KEYS["all"]} scopes=* name=all
{KEYS["rate"]} rate=3/hour name=rate
{KEYS["gone"]} name=gone
"""
SECRET_NAME = "Henrike Vollmar"
PROMPT = f"Hello, I am {SECRET_NAME} and my mail is henrike.vollmar@example.com."


def _env(home: Path) -> dict[str, str]:
    return offline_env(home, POTLUCK_P2P_ENABLED="false")


def _write_keys(path: Path, text: str) -> None:
    """Replace the keys file atomically (as an editor or a deploy script would), mode 0600."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    os.replace(tmp, path)


class Veth:
    """A namespace joined to this one by a veth pair: its sockets reach A from a non-loopback address."""

    _made = itertools.count()

    def __init__(self) -> None:
        i, pid = next(self._made), os.getpid() % 100000
        n = (pid % 60) * 4 + i % 4  # a /30 of its own per process and pair
        self.ns = Namespace(f"plk-auth-{pid}-{i}", f"10.213.{n}.2")
        self.host_ip = f"10.213.{n}.1"
        self.host_if, self.ns_if = f"plka{pid}x{i}h", f"plka{pid}x{i}c"

    def __enter__(self) -> Veth:
        sh("ip", "netns", "add", self.ns.name)
        try:
            sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.ns.name)
            sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            sh("ip", "link", "set", self.host_if, "up")
            self.ns.run("ip", "addr", "add", f"{self.ns.ip}/30", "dev", self.ns_if)
            self.ns.run("ip", "link", "set", self.ns_if, "up")
            self.ns.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        delete_namespace(self.ns.name)  # the veth pair goes with it
        sh("ip", "link", "del", self.host_if, check=False)

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NsConnection(http.client.HTTPConnection):
    """HTTP over a socket opened inside ``ns``."""

    def __init__(self, ns: Namespace, host: str, port: int) -> None:
        super().__init__(host, port, timeout=120)
        self._ns = ns

    def connect(self) -> None:
        self.sock = self._ns.connect((self.host, self.port), timeout=30)


def call(
    base: str | tuple[Namespace, str, int],
    method: str,
    path: str,
    key: str | None = None,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request: to ``base`` (a URL) from here, or from inside a namespace ``(ns, host, port)``."""
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    payload = json.dumps(body).encode() if body is not None else None
    if payload is not None:
        hdrs["Content-Type"] = "application/json"
    if isinstance(base, str):
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
    else:
        conn = _NsConnection(*base)
    try:
        conn.request(method, path, body=payload, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def chat(model: str | None = None, max_tokens: int = 4) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}
    if model:
        body["model"] = model
    return body


def _assert_openai_error(status: int, raw: bytes, want_status: int, code: str) -> dict[str, Any]:
    assert status == want_status, raw
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, model_path):
    """(node A, keys file, recording file, veth) with node B behind the recording proxy."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("auth")
    record = root / "upstream-requests.jsonl"
    record.touch()
    keys = root / "keys.txt"
    _write_keys(keys, KEYS_FILE)
    with NodeProcess(root / "b", "--model", str(model_path("q8_0")), env=_env(root / "b")) as node_b:
        node_b.wait_ready()
        with recording_proxy(node_b.url, record, root / "proxy.log") as proxy_url:
            args = ["--host", "0.0.0.0", "--api-keys-file", str(keys), "--model", str(model_path("q8_0"))]
            args += ["--cloud-url", proxy_url + "/v1", "--cloud-model", UPSTREAM_MODEL]
            with Veth() as veth, NodeProcess(root / "a", *args, env=_env(root / "a")) as node_a:
                node_a.wait_ready()  # /healthz needs no key
                yield node_a, keys, record, veth


def _upstream(record: Path) -> list[str]:
    return [json.loads(line)["body"] for line in record.read_text().splitlines() if line.strip()]


def _remote(swarm) -> tuple[Namespace, str, int]:
    node_a, _, _, veth = swarm
    return veth.ns, veth.host_ip, node_a.port


def test_missing_wrong_and_revoked_keys_get_401(swarm):
    node_a, keys, _, _ = swarm
    for path, method, body in [("/v1/models", "GET", None), ("/v1/chat/completions", "POST", chat())]:
        status, headers, raw = call(node_a.url, method, path, body=body)
        err = _assert_openai_error(status, raw, 401, "invalid_api_key")
        assert "Authorization: Bearer" in err["message"] and headers["www-authenticate"] == "Bearer"
        status, _, raw = call(node_a.url, method, path, key="sk-wrong-0000000000000000", body=body)
        _assert_openai_error(status, raw, 401, "invalid_api_key")
    for path in ("/api/node", "/api/cluster", "/", "/api/events", "/no/such/path"):  # dashboard and /api too
        status, _, raw = call(node_a.url, "GET", path)
        _assert_openai_error(status, raw, 401, "invalid_api_key")
    # the official client sees OpenAI's 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=node_a.url + "/v1", api_key="sk-wrong-0000000000000000", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=node_a.url + "/v1", api_key=KEYS["gone"], max_retries=0)
    assert ok.models.list().data
    # revoked: the line is removed from the file; the next request already fails, no restart or signal
    _write_keys(keys, "\n".join(line for line in KEYS_FILE.splitlines() if "name=gone" not in line) + "\n")
    status, _, raw = call(node_a.url, "GET", "/v1/models", key=KEYS["gone"])
    err = _assert_openai_error(status, raw, 401, "invalid_api_key")
    assert "revoked" in err["message"]
    with pytest.raises(openai.AuthenticationError):
        ok.models.list()
    status, _, _ = call(node_a.url, "GET", "/v1/models", key=KEYS["plain"])
    assert status == 200  # the other keys still work
    assert node_a.proc.poll() is None


def test_open_paths_and_metrics(swarm):
    node_a, *_ = swarm
    for path in ("/healthz", "/readyz"):
        assert call(node_a.url, "GET", path)[0] == 200
        assert call(_remote(swarm), "GET", path)[0] == 200
    status, _, raw = call(node_a.url, "GET", "/metrics")  # loopback: open
    assert status == 200 and b"potluck_" in raw
    status, _, raw = call(_remote(swarm), "GET", "/metrics")  # from another address: needs a key
    _assert_openai_error(status, raw, 401, "invalid_api_key")
    status, _, raw = call(_remote(swarm), "GET", "/metrics", key=KEYS["plain"])
    assert status == 200 and b"potluck_" in raw


def test_cloud_route_needs_the_cloud_scope(swarm):
    node_a, _, record, _ = swarm
    n_before = len(_upstream(record))
    status, _, raw = call(node_a.url, "POST", "/v1/chat/completions", key=KEYS["plain"], body=chat(CLOUD_MODEL))
    err = _assert_openai_error(status, raw, 403, "scope_required")
    assert "'cloud'" in err["message"] and err["type"] == "permission_error"
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=node_a.url + "/v1", api_key=KEYS["plain"], max_retries=0).chat.completions.create(
            model=CLOUD_MODEL, messages=chat()["messages"], max_tokens=4
        )
    assert len(_upstream(record)) == n_before  # nothing reached the cloud
    # a key without the scope still chats with the node's own model
    status, _, raw = call(node_a.url, "POST", "/v1/chat/completions", key=KEYS["plain"], body=chat())
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"]
    # with the scope (from another address too): answered by the cloud stand-in, sanitized on the way
    client = openai.OpenAI(base_url=node_a.url + "/v1", api_key=KEYS["cloud"], max_retries=0)
    reply = client.chat.completions.create(model=CLOUD_MODEL, messages=chat()["messages"], max_tokens=4)
    assert reply.choices[0].message.content
    status, _, raw = call(_remote(swarm), "POST", "/v1/chat/completions", key=KEYS["cloud"], body=chat(CLOUD_MODEL))
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"]
    bodies = _upstream(record)[n_before:]
    assert len(bodies) == 2 and all(SECRET_NAME not in b and "<PERSON_1>" in b for b in bodies)


def test_privacy_override_from_another_address_needs_the_scope(swarm):
    node_a, _, record, _ = swarm
    off = {"X-Potluck-Privacy": "off"}
    n_before = len(_upstream(record))
    for key in ("plain", "cloud"):  # neither has privacy-override
        status, _, raw = call(
            _remote(swarm), "POST", "/v1/chat/completions", key=KEYS[key], body=chat(CLOUD_MODEL), headers=off
        )
        err = _assert_openai_error(status, raw, 403, "scope_required")
        assert "privacy-override" in err["message"]
    assert len(_upstream(record)) == n_before  # nothing was sent, raw or sanitized
    # with the scope, "off" is honoured: the cloud gets the raw text
    status, _, raw = call(
        _remote(swarm), "POST", "/v1/chat/completions", key=KEYS["all"], body=chat(CLOUD_MODEL), headers=off
    )
    assert status == 200, raw
    (body,) = _upstream(record)[n_before:]
    assert SECRET_NAME in body
    assert node_a.proc.poll() is None


def test_rate_limit_overflow_gets_429_with_retry_after(swarm):
    node_a, *_ = swarm
    statuses = []
    for _ in range(3):  # rate=3/hour: a bucket of 3
        status, _, _ = call(node_a.url, "GET", "/v1/models", key=KEYS["rate"])
        statuses.append(status)
    assert statuses == [200, 200, 200]
    status, headers, raw = call(node_a.url, "GET", "/v1/models", key=KEYS["rate"])
    err = _assert_openai_error(status, raw, 429, "rate_limit_exceeded")
    retry = int(headers["retry-after"])
    assert 1 <= retry <= 1200 and f"{retry} s" in err["message"]  # one request refills in 3600/3 s
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=node_a.url + "/v1", api_key=KEYS["rate"], max_retries=0).models.list()
    assert call(node_a.url, "GET", "/v1/models", key=KEYS["plain"])[0] == 200  # other keys unaffected


def test_dashboard_key_in_query_becomes_a_cookie(swarm):
    node_a, *_ = swarm
    status, headers, _ = call(node_a.url, "GET", f"/?key={KEYS['plain']}")
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    jar = {"Cookie": cookie.split(";", 1)[0]}
    status, headers, raw = call(node_a.url, "GET", "/", headers=jar)
    assert status == 200 and headers["content-type"].startswith("text/html")
    status, _, _ = call(node_a.url, "POST", "/v1/chat/completions", body=chat(), headers=jar)  # the page's chat
    assert status == 200
    # EventSource cannot send headers: /api/events takes ?key= (first bytes of the stream, then close)
    host, port = node_a.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", f"/api/events?key={KEYS['plain']}")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/event-stream")
        assert resp.read1(64)
    finally:
        conn.close()
    # the query parameter is for the dashboard only
    status, _, raw = call(node_a.url, "GET", f"/v1/models?key={KEYS['plain']}")
    _assert_openai_error(status, raw, 401, "invalid_api_key")


def test_cli_sends_the_key(swarm, tmp_path):
    node_a, *_ = swarm
    env = _env(tmp_path)
    run = [*POTLUCK, "status", "--url", node_a.url, "--json"]
    denied = subprocess.run(run, capture_output=True, text=True, timeout=120, env=env)
    assert denied.returncode == 1 and "401" in denied.stdout + denied.stderr
    ok = subprocess.run([*run, "--api-key", KEYS["plain"]], capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["peer_id"]
    env["POTLUCK_API_KEY"] = KEYS["plain"]
    peers = subprocess.run(
        [*POTLUCK, "chat", "--url", node_a.url, "-n", "3", "hi"], capture_output=True, text=True, timeout=120, env=env
    )
    assert peers.returncode == 0, peers.stderr


def test_non_loopback_bind_without_a_key_refuses_to_start(tmp_path, model_path):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    port = free_port()
    argv = [*POTLUCK, "node", "start", "--host", "0.0.0.0", "--port", str(port), "--model", str(model_path("q8_0"))]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_env(tmp_path / "refused"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "refusing to serve the API on '0.0.0.0' without an API key" in out and "--no-auth" in out
    with socket.socket() as s:  # nothing listens on the port
        assert s.connect_ex(("127.0.0.1", port)) != 0
    # --no-auth opens it explicitly: no key needed, but callers from other addresses get no scopes
    with (
        Veth() as veth,
        NodeProcess(
            tmp_path / "open",
            "--host",
            "0.0.0.0",
            "--no-auth",
            "--model",
            str(model_path("q8_0")),
            env=_env(tmp_path / "open"),
        ) as node,
    ):
        node.wait_ready()
        remote = (veth.ns, veth.host_ip, node.port)
        off = {"X-Potluck-Privacy": "off"}
        assert call(remote, "POST", "/v1/chat/completions", body=chat())[0] == 200
        status, _, raw = call(remote, "POST", "/v1/chat/completions", body=chat(), headers=off)
        _assert_openai_error(status, raw, 403, "scope_required")
        # loopback clients without keys keep today's behaviour
        assert call(node.url, "POST", "/v1/chat/completions", body=chat(), headers=off)[0] == 200
        assert node.stop(signal.SIGINT) == 0
