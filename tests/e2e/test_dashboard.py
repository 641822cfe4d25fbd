"""The dashboard in a real browser: Debian's headless Chromium (driven by Playwright) against three
real ``potluck node start`` processes, all inside a fresh network namespace whose only interface is
loopback (so the page provably needs nothing from the internet: no CDN, no fonts, no downloads).

What the browser must see, on the bootstrap node's page (``http://127.0.0.1:<port>/``):

- all three devices in the swarm graph, and a link to each peer labelled with its path and RTT;
- a chat sent from the page streams a reply from a peer's model, with TTFT, tokens/s, the route
  (``peer ...``) and "sanitized" under it; the toggle shows the text that left, with its typed
  placeholder instead of the e-mail address;
- a model pull fails offline with the clear error shown in the page;
- a peer that is killed disappears from the graph within its record's expiry (``state_ttl_s``);
- no console errors and no uncaught page errors.

The pytest test creates the namespace and runs this module's :func:`main` inside it
(``ip netns exec NS python -m tests.e2e.test_dashboard WORKDIR MODELS``), so the nodes, the
browser and the checks all live in the namespace. Screenshots go to ``WORKDIR/artifacts`` and, if
``POTLUCK_ARTIFACTS`` is set, are copied there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.procs import NodeProcess, free_port, get_json, swarm_env

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(480)]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
TTL_S = 8.0  # state_ttl_s that swarm_env sets: a killed peer must leave the graph within this
SERVED = "tinyshakespeare-q8_0"  # the two peers' model; the page chats with it through the swarm
SECRET_EMAIL = "jane.doe@example.com"


def test_dashboard_in_chromium_offline(tmp_path: Path, shared_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root to create a loopback-only network namespace (running as uid {os.geteuid()})")
    if shutil.which("ip") is None:
        pytest.skip("`ip` is missing (apt-get install iproute2)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from tests.netem.netns import delete_namespace, sh

    ns = f"potluck-dash-{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        scenario = [sys.executable, "-m", "tests.e2e.test_dashboard", str(tmp_path), str(shared_dir)]
        run = subprocess.run(
            ["ip", "netns", "exec", ns, *scenario],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=420,
        )
    finally:
        delete_namespace(ns)
        _keep_artifacts(tmp_path / "artifacts")
    assert run.returncode == 0, f"browser scenario failed:\n{run.stdout[-12000:]}\n{_node_logs(tmp_path)}"
    for shot in ("swarm.png", "chat.png", "peer-gone.png", "dashboard.png"):
        assert (tmp_path / "artifacts" / shot).stat().st_size > 10_000, shot


def _keep_artifacts(folder: Path) -> None:
    dest = os.environ.get("POTLUCK_ARTIFACTS")
    if dest and folder.is_dir():
        target = Path(dest) / "dashboard"
        target.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            shutil.copy2(f, target / f.name)


def _node_logs(workdir: Path) -> str:
    parts = []
    for log in sorted(workdir.glob("*/node.log")):
        parts.append(f"--- {log.parent.name}/node.log (tail)\n{log.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


# ---------------------------------------------------------------------- inside the namespace
def _assert_offline() -> None:
    """Only loopback is up: nothing outside this machine (not even a route) is reachable."""
    for addr in (("1.1.1.1", 53), ("10.0.0.1", 80)):
        try:
            socket.create_connection(addr, timeout=2).close()
        except OSError:
            continue
        raise AssertionError(f"{addr} is reachable: the namespace is not cut off")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"], links


def _start_swarm(workdir: Path, models: Path) -> list[NodeProcess]:
    swarm = f"dash-{os.getpid()}"

    def env(home: Path) -> dict[str, str]:
        return swarm_env(home, swarm, "dashboard-secret", "20")  # records live TTL_S (8 s)

    boot_port = free_port()
    boot = NodeProcess(
        workdir / "boot",
        "-m",
        str(models / "tinyshakespeare-q4_0.gguf"),
        "--p2p-port",
        str(boot_port),
        env=env(workdir / "boot"),
    )
    nodes = [boot]
    boot.wait_ready()
    boot_id = get_json(boot.url + "/api/node")["peer_id"]
    addr = f"/ip4/127.0.0.1/tcp/{boot_port}/p2p/{boot_id}"
    for i in range(2):
        home = workdir / f"peer{i}"
        nodes.append(NodeProcess(home, "-m", str(models / f"{SERVED}.gguf"), "--bootstrap", addr, env=env(home)))
    for n in nodes[1:]:
        n.wait_ready()
    return nodes


def main(workdir: Path, shared: Path) -> None:
    from playwright.sync_api import sync_playwright

    _assert_offline()
    shots = workdir / "artifacts"
    shots.mkdir(parents=True, exist_ok=True)
    nodes = _start_swarm(workdir, shared / "models")
    boot = nodes[0]
    ids = [get_json(n.url + "/api/node")["peer_id"] for n in nodes]
    problems: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(boot.url + "/")

            # 1. Three devices, and a link to each peer labelled with its path and a measured RTT.
            page.wait_for_function(
                """ids => ids.every(id => document.querySelector(`#graph g.device[data-peer-id="${id}"]`))
                   && [...document.querySelectorAll('#graph g.link')].length === 2
                   && [...document.querySelectorAll('#graph g.link text')]
                        .every(t => / · [0-9.]+ ms$/.test(t.textContent))""",
                arg=ids,
                timeout=90_000,
            )
            labels = page.locator("#graph g.link text").all_text_contents()
            assert all(label.startswith("direct · ") for label in labels), labels
            assert page.locator("#devices tbody tr").count() == 3
            page.screenshot(path=str(shots / "swarm.png"))

            # 2. A chat from the page streams a reply from a peer, sanitized on the way out.
            page.wait_for_function(
                f"[...document.querySelectorAll('#chat-model option')].some(o => o.value === '{SERVED}')",
                timeout=60_000,
            )
            page.select_option("#chat-model", SERVED)
            page.fill("#chat-input", f"ROMEO: write to {SECRET_EMAIL} and say")
            page.click("#chat-send")
            page.wait_for_function(
                """() => { const a = document.querySelector('.msg.assistant');
                           return a && a.dataset.state === 'streaming'
                                  && a.querySelector('.content').textContent.length > 0; }""",
                timeout=120_000,
            )  # text is on the page while the answer is still streaming
            page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
            meta = page.locator(".msg.assistant .meta").inner_text()
            assert "TTFT" in meta and "tok/s" in meta and "route: peer" in meta and "sanitized" in meta, meta
            assert "not sanitized" not in meta, meta
            page.click(".msg.assistant .meta button")
            sent = page.locator(".msg.assistant pre.sent").inner_text()
            assert SECRET_EMAIL not in sent and "<EMAIL" in sent, sent
            page.screenshot(path=str(shots / "chat.png"))

            # 3. A pull fails offline, and the page says why.
            page.fill("#pull-spec", "bartowski/none:missing.gguf")
            page.click("#pull-form button")
            failed = page.wait_for_selector(".pull[data-state=failed]", timeout=60_000)
            assert "no network connection" in failed.inner_text() or "cannot download" in failed.inner_text()
            page.wait_for_function("document.querySelectorAll('#counters b')[1]?.textContent !== '0'")  # tokens
            page.screenshot(path=str(shots / "dashboard.png"), full_page=True)

            # 4. A killed peer leaves the graph within its record's expiry.
            victim = nodes[2]
            victim.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            page.wait_for_selector(
                f'#graph g.device[data-peer-id="{ids[2]}"]', state="detached", timeout=(TTL_S + 20) * 1000
            )
            gone_after = time.monotonic() - killed_at
            assert gone_after <= TTL_S + 3, f"the killed peer stayed {gone_after:.1f} s (expiry {TTL_S} s)"
            assert page.locator("#graph g.device").count() == 2
            page.wait_for_function("document.querySelector('#activity').textContent.includes('left')")
            page.screenshot(path=str(shots / "peer-gone.png"))
            print(f"killed peer left the graph after {gone_after:.1f} s")
            browser.close()
    finally:
        for n in nodes:
            n.stop()
    assert not problems, "\n".join(problems)
    print("dashboard scenario passed")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
