"""Audit log of every request that leaves the trust boundary (tier >= 2).

One JSON object per line in ``<data_dir>/privacy-audit.jsonl`` (file mode 0600)::

    {"time": "2026-01-01T12:00:00.000000+00:00", "destination": "cloud/gpt-4o-mini", "tier": 3,
     "level": "standard", "action": "sanitize", "entities": {"PERSON": 2, "EMAIL_ADDRESS": 1},
     "sanitized_sha256": "9f86d0...", "chars": 1234}

Never raw values, never the mapping, never the text: only counts and a SHA-256 of the text as it
was sent (so a user can check a provider's logs against it). Appends are serialized by a lock and
written with ``O_APPEND``; a line is at most a few hundred bytes, so concurrent writers of one
process never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUDIT_FILE = "privacy-audit.jsonl"


@dataclass(frozen=True)
class AuditRecord:
    """One outbound request (see module docstring for the JSON form)."""

    destination: str
    tier: int
    level: str
    action: str  # "sanitize" or "raw"
    entities: dict[str, int]
    sanitized_sha256: str
    chars: int
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AuditRecord:
        """Parse one line's object.

        Raises:
            ValueError: a field is missing or of the wrong type.
        """
        try:
            return cls(
                destination=str(obj["destination"]),
                tier=int(obj["tier"]),
                level=str(obj["level"]),
                action=str(obj["action"]),
                entities={str(k): int(v) for k, v in dict(obj["entities"]).items()},
                sanitized_sha256=str(obj["sanitized_sha256"]),
                chars=int(obj["chars"]),
                time=str(obj["time"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an audit record: {exc}") from exc


class AuditLog:
    """Append-only JSON-lines audit file.

    Args:
        path: the file (created with mode 0600 on first write; parents created).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> AuditLog:
        return cls(data_dir / AUDIT_FILE)

    def append(self, record: AuditRecord) -> None:
        """Write one record (blocking, small).

        Raises:
            OSError: the file cannot be written. Callers treat this as a policy failure and send
                nothing (an outbound request without its audit entry is not allowed).
        """
        line = (json.dumps(asdict(record), sort_keys=True) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def records(self) -> Iterator[AuditRecord]:
        """Every readable record, oldest first; malformed lines are skipped with a warning."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield AuditRecord.from_json(json.loads(line))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                log.warning("%s line %d: skipped (%s)", self.path, n, exc)
