"""The API-key middleware and key loading, on a real aiohttp server (in-process, fake clock).

A non-loopback caller is made with ``request.clone(remote=...)`` in an outer middleware, as a
reverse-proxy middleware would; the end-to-end tests (tests/e2e/test_auth.py) use a real
non-loopback socket.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from potluck.config import Settings
from potluck.errors import ConfigError
from potluck.node.auth import (
    Authenticator,
    RateLimiter,
    TokenBucket,
    authenticator_from_settings,
    caller_scopes,
    check_bind,
    host_is_loopback,
    is_loopback,
)
from potluck.node.keys import KeyFile, KeyRing, Rate, parse_key_line, parse_keys, parse_rate
from potluck.routing.scopes import ALL_SCOPES, CLOUD, PRIVACY_OVERRIDE

PLAIN = "sk-plain-0123456789abcdef"
CLOUDY = "sk-cloud-0123456789abcdef"
OWNER = "sk-owner-0123456789abcdef"
LIMITED = "sk-limit-0123456789abcdef"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ring(*lines: str) -> KeyRing:
    return KeyRing(parse_keys(lines, "test"))


async def _whoami(request: web.Request) -> web.Response:
    return web.json_response({"scopes": sorted(caller_scopes(request))})


@asynccontextmanager
async def serve(auth: Authenticator, remote: str | None = None) -> AsyncIterator[aiohttp.ClientSession]:
    """An app with the middleware in front of a few routes; ``remote`` fakes the caller's address."""

    @web.middleware
    async def from_remote(request: web.Request, handler: Callable) -> web.StreamResponse:
        return await handler(request.clone(remote=remote) if remote else request)

    app = web.Application(middlewares=[from_remote, auth.middleware])
    for path in ("/v1/models", "/api/node", "/", "/api/events", "/static/app.js", "/metrics", "/healthz", "/readyz"):
        app.router.add_get(path, _whoami)
    app.router.add_post("/v1/chat/completions", _whoami)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        jar = aiohttp.CookieJar(unsafe=True)  # keep cookies of an IP-address host, as a browser does
        async with aiohttp.ClientSession(f"http://{host}:{port}", cookie_jar=jar) as http:
            yield http
    finally:
        await runner.cleanup()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _error(resp: aiohttp.ClientResponse, status: int, code: str) -> dict:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code
    return body["error"]


# --- key entries -------------------------------------------------------------------------------


def test_key_line_grammar():
    key = parse_key_line(f"{CLOUDY}  scopes=cloud rate=60/min name=laptop  # comment", "f:1")
    assert key is not None and key.scopes == {CLOUD} and key.rate == Rate(60, 60.0) and key.name == "laptop"
    assert PLAIN not in repr(key) and len(key.key_id) == 12
    star = parse_key_line(f"{OWNER} scopes=*", "f:2")
    assert star is not None and star.scopes == ALL_SCOPES and star.rate is None and star.name == "f:2"
    bare = parse_key_line(PLAIN, "f:3")
    assert bare is not None and bare.scopes == frozenset()
    assert parse_key_line("   # only a comment", "f:4") is None and parse_key_line("", "f:5") is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f"{PLAIN} scopes=cloud,admin", "f:7: unknown scope 'admin'"),
        (f"{PLAIN} colour=blue", "f:7: unknown attribute 'colour'"),
        (f"{PLAIN} scopes", "is not attribute=value"),
        (f"{PLAIN} rate=5/day", "f:7: rate: '5/day' is not a rate"),
        (f"{PLAIN} rate=0/min", "is not a rate"),
        ("sk-short", "fewer than 16"),
    ],
)
def test_bad_key_lines_name_what_is_wrong(line, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_key_line(line, "f:7")
    assert PLAIN not in str(info.value)


def test_duplicate_key_is_refused():
    with pytest.raises(ConfigError, match="keys:3: the same key appears twice"):
        parse_keys([PLAIN, "", f"{PLAIN} scopes=cloud"], "keys")


def test_rates():
    assert parse_rate("10/s").per_s == 10 and parse_rate("3/hour") == Rate(3, 3600.0)
    assert parse_rate(" 1.5 / min ").per_s == pytest.approx(0.025)


def test_lookup_finds_the_key_and_only_it():
    ring = _ring(PLAIN, f"{CLOUDY} scopes=cloud")
    found = ring.lookup(CLOUDY)
    assert found is not None and found.scopes == {CLOUD}
    assert ring.lookup(CLOUDY + "x") is None and ring.lookup("") is None and ring.lookup(CLOUDY[:-1]) is None


# --- the keys file ---------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)


def test_key_file_reloads_on_change_and_fails_closed(tmp_path, caplog):
    path = tmp_path / "keys"
    _write(path, f"{PLAIN}\n{CLOUDY} scopes=cloud\n")
    ring = KeyRing(file=KeyFile(path))
    assert ring.lookup(PLAIN) and ring.lookup(CLOUDY)
    _write(path, f"{CLOUDY} scopes=cloud\n")  # revoke PLAIN
    assert ring.lookup(PLAIN) is None and ring.lookup(CLOUDY)
    with caplog.at_level(logging.ERROR, "potluck.node.keys"):
        _write(path, f"{CLOUDY} scopes=clod\n")  # a typo: every key of the file is revoked
        assert ring.lookup(CLOUDY) is None
        assert "unknown scope 'clod'" in caplog.text
        path.unlink()
        assert ring.lookup(CLOUDY) is None and ring.configured  # still "keys required"
    _write(path, f"{CLOUDY} scopes=cloud\n")
    assert ring.lookup(CLOUDY)


def test_key_file_missing_or_invalid_at_start(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        KeyFile(tmp_path / "nope")
    bad = tmp_path / "bad"
    _write(bad, "sk-short\n")
    with pytest.raises(ConfigError, match=f"{bad}:1: the key is 8 characters"):
        KeyFile(bad)


def test_key_file_readable_by_others_warns(tmp_path, caplog):
    path = tmp_path / "keys"
    path.write_text(PLAIN + "\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, "potluck.node.keys"):
        KeyFile(path)
    assert "chmod 600" in caplog.text


# --- binding -----------------------------------------------------------------------------------------


def test_non_loopback_bind_needs_a_key_or_no_auth():
    with pytest.raises(ConfigError, match=r"refusing to serve the API on '0\.0\.0\.0' without an API key") as info:
        check_bind("0.0.0.0", KeyRing(), no_auth=False)
    assert "--api-key" in str(info.value) and "--no-auth" in str(info.value)
    with pytest.raises(ConfigError):
        check_bind("192.0.2.10", KeyRing(), no_auth=False)
    check_bind("0.0.0.0", _ring(PLAIN), no_auth=False)
    check_bind("0.0.0.0", KeyRing(), no_auth=True)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(host, KeyRing(), no_auth=False)
    with pytest.raises(ConfigError, match="--no-auth contradicts"):
        check_bind("127.0.0.1", _ring(PLAIN), no_auth=True)


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.2") and not is_loopback(None) and not is_loopback("garbage")
    assert host_is_loopback("localhost") and not host_is_loopback("0.0.0.0") and not host_is_loopback("::")


def test_settings_build_the_authenticator(tmp_path):
    keys = tmp_path / "keys"
    _write(keys, f"{CLOUDY} scopes=cloud\n")
    s = Settings(host="0.0.0.0", api_keys=[f"{PLAIN} rate=2/min"], api_keys_file=keys, api_rate_limit="5/s")
    auth = authenticator_from_settings(s)
    assert auth.keys.lookup(PLAIN) and auth.keys.lookup(CLOUDY) and auth.limiter.default == Rate(5, 1.0)
    with pytest.raises(ConfigError, match="without an API key"):
        authenticator_from_settings(Settings(host="0.0.0.0"))


def test_env_keys_split_on_semicolons(monkeypatch):
    monkeypatch.setenv("POTLUCK_API_KEYS", f"{PLAIN} scopes=cloud; {CLOUDY}")
    s = Settings()
    assert [k.get_secret_value() for k in s.api_keys] == [f"{PLAIN} scopes=cloud", CLOUDY]


# --- token bucket --------------------------------------------------------------------------------------


def test_token_bucket_refills_evenly():
    bucket = TokenBucket(Rate(2, 60.0), now=0.0)
    assert bucket.take(0.0) == 0 and bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(30.0)  # one token every 30 s
    assert bucket.take(10.0) == pytest.approx(20.0)
    assert bucket.take(30.0) == 0
    assert bucket.take(1000.0) == 0 and bucket.take(1000.0) == 0 and bucket.take(1000.0) > 0  # capped at 2


# --- the middleware over HTTP ---------------------------------------------------------------------------


def _auth(clock: FakeClock | None = None, default: Rate | None = None) -> Authenticator:
    ring = _ring(PLAIN, f"{CLOUDY} scopes=cloud", f"{OWNER} scopes=*", f"{LIMITED} rate=2/min")
    return Authenticator(ring, limiter=RateLimiter(default, clock or FakeClock()))


async def test_missing_wrong_and_malformed_keys_get_401():
    async with serve(_auth()) as http:
        for path in ("/v1/models", "/api/node", "/", "/api/events", "/static/app.js", "/no/such/route"):
            async with http.get(path) as resp:
                err = await _error(resp, 401, "invalid_api_key")
                assert resp.headers["WWW-Authenticate"] == "Bearer" and "Bearer" in err["message"]
        async with http.post("/v1/chat/completions", headers=bearer("sk-nope-0123456789abcdef")) as resp:
            err = await _error(resp, 401, "invalid_api_key")
            assert "incorrect or revoked" in err["message"]
        async with http.get("/v1/models", headers={"Authorization": f"Basic {PLAIN}"}) as resp:
            err = await _error(resp, 401, "invalid_api_key")
            assert "must be 'Bearer <key>'" in err["message"]
        async with http.get("/v1/models", headers=bearer(PLAIN)) as resp:
            assert resp.status == 200 and (await resp.json())["scopes"] == []
        async with http.get("/v1/models", headers={"authorization": f"bearer {OWNER}"}) as resp:
            assert (await resp.json())["scopes"] == sorted(ALL_SCOPES)


@pytest.mark.parametrize("remote", [None, "192.0.2.7"])
async def test_open_paths_and_metrics(remote):
    async with serve(_auth(), remote) as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(path) as resp:
                assert resp.status == 200
        async with http.get("/metrics") as resp:
            assert resp.status == (200 if remote is None else 401)
        async with http.get("/metrics", headers=bearer(PLAIN)) as resp:
            assert resp.status == 200


async def test_dashboard_query_key_sets_a_cookie():
    async with serve(_auth()) as http:
        async with http.get(f"/?key={PLAIN}", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/"
            cookie = resp.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        async with http.get("/") as resp:  # the session now carries the cookie
            assert resp.status == 200
        async with http.post("/v1/chat/completions") as resp:  # the page's own chat requests too
            assert resp.status == 200
    async with serve(_auth()) as http:
        async with http.get(f"/api/events?key={PLAIN}") as resp:
            assert resp.status == 200
        async with http.get(f"/static/app.js?key={PLAIN}") as resp:
            assert resp.status == 200
        async with http.get(f"/v1/models?key={PLAIN}") as resp:  # not a dashboard path
            await _error(resp, 401, "invalid_api_key")
        async with http.get(f"/?key={PLAIN}x", allow_redirects=False) as resp:
            await _error(resp, 401, "invalid_api_key")


async def test_rate_limit_429_with_retry_after_per_key():
    clock = FakeClock()
    async with serve(_auth(clock)) as http:
        for _ in range(2):
            async with http.get("/v1/models", headers=bearer(LIMITED)) as resp:
                assert resp.status == 200
        async with http.get("/v1/models", headers=bearer(LIMITED)) as resp:
            err = await _error(resp, 429, "rate_limit_exceeded")
            assert resp.headers["Retry-After"] == "30" and "30 s" in err["message"]
        async with http.get("/v1/models", headers=bearer(PLAIN)) as resp:  # no rate, no default: unlimited
            assert resp.status == 200
        clock.now += 30
        async with http.get("/v1/models", headers=bearer(LIMITED)) as resp:
            assert resp.status == 200


async def test_default_rate_applies_to_keys_without_one():
    clock = FakeClock()
    async with serve(_auth(clock, default=Rate(1, 1.0))) as http:
        async with http.get("/v1/models", headers=bearer(PLAIN)) as resp:
            assert resp.status == 200
        async with http.get("/v1/models", headers=bearer(PLAIN)) as resp:
            await _error(resp, 429, "rate_limit_exceeded")
            assert resp.headers["Retry-After"] == "1"


@pytest.mark.parametrize("remote", [None, "192.0.2.7"])
async def test_privacy_off_needs_the_override_scope(remote):
    off = {"X-Potluck-Privacy": "off"}
    async with serve(_auth(), remote) as http:
        for key in (PLAIN, CLOUDY):
            async with http.post("/v1/chat/completions", headers={**bearer(key), **off}) as resp:
                err = await _error(resp, 403, "scope_required")
                assert PRIVACY_OVERRIDE in err["message"]
        async with http.post("/v1/chat/completions", headers={**bearer(OWNER), **off}) as resp:
            assert resp.status == 200
        async with http.post("/v1/chat/completions", headers={**bearer(PLAIN), "X-Potluck-Privacy": "strict"}) as resp:
            assert resp.status == 200


async def test_without_keys_loopback_keeps_every_scope_and_others_get_none():
    open_auth = Authenticator(KeyRing(), no_auth=True)
    async with serve(open_auth) as http:
        async with http.post("/v1/chat/completions", headers={"X-Potluck-Privacy": "off"}) as resp:
            assert resp.status == 200 and (await resp.json())["scopes"] == sorted(ALL_SCOPES)
        async with http.get("/metrics") as resp:
            assert resp.status == 200
    async with serve(open_auth, remote="192.0.2.7") as http:
        async with http.get("/v1/models") as resp:
            assert resp.status == 200 and (await resp.json())["scopes"] == []
        async with http.post("/v1/chat/completions", headers={"X-Potluck-Privacy": "off"}) as resp:
            await _error(resp, 403, "scope_required")
