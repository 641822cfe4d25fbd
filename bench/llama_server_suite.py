"""llama.cpp's own server test suite, its OpenAI-endpoint tests, run against a potluck node.

The suite is ``vendor/llama.cpp/tools/server/tests`` inside the llama-cpp-python source
distribution. This script:

1. fetches that sdist with pip (``pip download --no-binary :all: --no-deps llama-cpp-python==V``)
   into a cache directory and unpacks only the tests folder (nothing is vendored into the repo);
2. makes a virtualenv for the suite from the suite's own ``requirements.txt`` (once, cached);
3. starts ``potluck node start --model M --embedding-model M`` on a free port, with aliases for
   the model names the suite hard-codes (``gpt-4.1``, ``davinci-002``... -> M: the feature
   exists for exactly such clients);
4. runs the suite with ``DEBUG_EXTERNAL=1 PORT=...`` (its ``utils.ServerProcess`` then talks to
   the running server instead of starting ``llama-server``), keeping only the tests that call an
   OpenAI endpoint (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
   ``/v1/responses``, or the ``openai`` client); llama-server's native endpoints (``/completion``,
   ``/embeddings``, ``/tokenize``, ``/slots``, ``/infill``...) are out of scope. llama-server also
   answers its OpenAI routes without the ``/v1`` prefix (``/chat/completions``); the plugin maps
   those to ``/v1/...`` so the tests reach potluck's routes;
5. prints a pass/fail table with each failure's first line.

The suite asserts llama-server's streaming shape, where the first chunk carries ``role`` with
``content: null``; potluck sends ``content: ""`` there, as OpenAI does, which fails every streamed
test before it reaches the part under test. ``--null-role-content`` reads that one value as null,
to see what the streamed tests say about the rest.

Usage: python bench/llama_server_suite.py [--model PATH] [--version 0.3.36] [--files unit/test_x.py ...]
       [-k EXPR] [--cache DIR] [--junit OUT.xml]
Default model: SmolLM2-135M-Instruct Q4_1 from ../shared/scripts/real-models.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.e2e.procs import NodeProcess, offline_env  # noqa: E402

DEFAULT_FILES = [
    "unit/test_chat_completion.py",
    "unit/test_completion.py",
    "unit/test_tool_call.py",
    "unit/test_embedding.py",
    "unit/test_compat_oai_responses.py",
]
# Model names the selected tests send; each is aliased to the served model.
SUITE_MODEL_NAMES = [
    "gpt-4.1",
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-instruct",
    "davinci-002",
    "text-embedding-3-small",
    "codellama70b",
    "tinyllama-2",
    "bert-bge-small",
]

PLUGIN = r'''
"""Run llama.cpp's server tests against an OpenAI-compatible server that serves only /v1 routes."""
import inspect
import os
import re

import pytest

OPENAI = re.compile(r'"/(v1/)?(chat/completions|completions|embeddings|responses)"|OpenAI\(')
NATIVE_ONLY = {"/embeddings"}  # llama-server's own embeddings format (unprefixed), not OpenAI's
UNPREFIXED = {"/chat/completions", "/completions", "/responses"}


def _source(item):
    fn = getattr(item, "function", None)
    if fn is None:
        return ""
    src = inspect.getsource(fn)
    module = inspect.getmodule(fn)
    for name in set(re.findall(r"\b(do_test_\w+|[a-z_]+_helper)\(", src)):
        helper = getattr(module, name, None)
        if callable(helper):
            src += inspect.getsource(helper)
    return src


def _openai(src):
    hits = [m.group(0) for m in OPENAI.finditer(src)]
    return any(h.strip('"') not in NATIVE_ONLY for h in hits)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        (keep if _openai(_source(item)) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


@pytest.fixture(autouse=True)
def _v1_routes(monkeypatch):
    import utils

    make_url = utils.ServerProcess.make_url

    def v1(self, path, host=None):
        if path.split("?")[0] in UNPREFIXED:
            path = "/v1" + path
        return make_url(self, path, host)

    monkeypatch.setattr(utils.ServerProcess, "make_url", v1)

    if os.environ.get("POTLUCK_SUITE_NULL_ROLE_CONTENT"):
        stream = utils.ServerProcess.make_stream_request

        def null_role_content(self, *args, **kwargs):
            for data in stream(self, *args, **kwargs):
                for choice in data.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if "role" in delta and delta.get("content") == "":
                        delta["content"] = None
                yield data

        monkeypatch.setattr(utils.ServerProcess, "make_stream_request", null_role_content)
'''


def real_model() -> Path:
    out = subprocess.run([str(REPO.parent / "shared/scripts/real-models")], capture_output=True, text=True, check=True)
    return Path(dict(line.split(" ", 1) for line in out.stdout.splitlines())["smollm2-q4_1"])


def fetch_suite(version: str, cache: Path) -> Path:
    """The unpacked ``tools/server/tests`` folder of llama-cpp-python ``version``'s sdist."""
    root = cache / f"llama-cpp-python-{version}"
    tests = root / "tests"
    if (tests / "utils.py").is_file():
        return tests
    sdist_dir = cache / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    sdist = sdist_dir / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q"]
        subprocess.run([*pip, "-d", str(sdist_dir), f"llama-cpp-python=={version}"], check=True)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/tools/server/tests/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(prefix) :] or "."
        tar.extractall(tests, members=members, filter="data")
    return tests


def suite_python(tests: Path, cache: Path) -> Path:
    """A virtualenv with the suite's own requirements (created once)."""
    venv = cache / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(tests / "requirements.txt")], check=True)
    return python


def run(args: argparse.Namespace) -> int:
    cache = Path(args.cache).expanduser()
    tests = fetch_suite(args.version, cache)
    python = suite_python(tests, cache)
    (tests / "potluck_openai_plugin.py").write_text(PLUGIN)
    model = Path(args.model) if args.model else real_model()
    model_id = model.stem
    with tempfile.TemporaryDirectory(prefix="potluck-llama-suite-") as tmp:
        home = Path(tmp)
        env = offline_env(home, POTLUCK_P2P_ENABLED="false", POTLUCK_N_CTX=str(args.ctx))
        aliases = [a for name in SUITE_MODEL_NAMES for a in ("--alias", f"{name}={model_id}")]
        node_args = ["--model", str(model), "--embedding-model", str(model), *aliases]
        with NodeProcess(home, *node_args, env=env) as node:
            node.wait_ready(timeout=300)
            junit = Path(args.junit) if args.junit else home / "junit.xml"
            cmd = [str(python), "-m", "pytest", "-p", "potluck_openai_plugin", "-p", "no:cacheprovider", "-q"]
            cmd += ["--junitxml", str(junit), "-o", "junit_family=xunit2", *args.files]
            if args.k:
                cmd += ["-k", args.k]
            suite_env = {**os.environ, "DEBUG_EXTERNAL": "1", "PORT": str(node.port), "PYTHONPATH": str(tests)}
            if args.null_role_content:
                suite_env["POTLUCK_SUITE_NULL_ROLE_CONTENT"] = "1"
            proc = subprocess.run(cmd, cwd=tests, env=suite_env, capture_output=True, text=True, check=False)
            if not junit.exists():
                print(proc.stdout[-4000:], proc.stderr[-4000:])
                return 2
            return report(junit, model_id, args.version)


def report(junit: Path, model_id: str, version: str) -> int:
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            first = (bad.get("message") or bad.text or "").strip().splitlines()
            rows.append((name, "FAIL", first[0][:150] if first else ""))
        elif skipped is not None:
            rows.append((name, "skip", (skipped.get("message") or "")[:150]))
        else:
            rows.append((name, "pass", ""))
    width = max((len(r[0]) for r in rows), default=10)
    print(f"llama.cpp server tests (llama-cpp-python {version}), OpenAI endpoints, against potluck on {model_id}")
    for name, status, why in rows:
        print(f"{name:<{width}}  {status:<4}  {why}")
    counts = {s: sum(1 for r in rows if r[1] == s) for s in ("pass", "FAIL", "skip")}
    print(f"\n{counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped of {len(rows)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF to serve (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--version", default="0.3.36", help="llama-cpp-python sdist version")
    parser.add_argument("--cache", default="~/.cache/potluck/llama-server-suite", help="sdist, tests and venv")
    parser.add_argument("--files", nargs="+", default=DEFAULT_FILES, help="test files, relative to tests/")
    parser.add_argument("-k", help="pytest -k expression")
    parser.add_argument("--ctx", type=int, default=4096, help="node context length")
    parser.add_argument("--junit", help="keep the JUnit XML here")
    parser.add_argument(
        "--null-role-content",
        action="store_true",
        help="read a stream's first chunk's content '' (OpenAI's) as null (llama-server's), which the suite asserts",
    )
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
