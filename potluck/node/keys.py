"""API keys: where they come from, what each may do, and looking one up in constant time.

Keys come from three places, all optional and merged: ``--api-key`` (repeatable), the
``POTLUCK_API_KEYS`` environment variable (entries separated by ``;`` or newlines; setting
``api_keys``), and a keys file (``--api-keys-file``). Every entry, in every source, is one line::

    <key> [scopes=<scope>[,<scope>...]] [rate=<N>/<s|min|h>] [name=<label>]

    sk-owner-0123456789abcdef  scopes=*                      # every scope
    sk-laptop-0123456789abcdef scopes=cloud rate=60/min name=laptop
    sk-guest-0123456789abcdef  rate=10/min                   # plain completions only

* ``scopes``: ``cloud`` (may use ``cloud/<model>`` routes) and ``privacy-override`` (``X-Potluck-Privacy:
  off`` is honoured), comma-separated, or ``*`` for both (:mod:`potluck.routing.scopes`). A key
  without ``scopes=`` has none: it may chat with local and swarm models and open the dashboard.
* ``rate``: a per-key request budget, a token bucket of ``N`` requests refilled evenly over the
  period (``s``, ``min`` or ``h``); without it, the ``api_rate_limit`` setting (default: unlimited).
* ``#`` starts a comment; blank lines are skipped. A key is at least :data:`MIN_KEY_CHARS`
  characters. Anything else (an unknown attribute or scope, a duplicate key) is a
  :class:`~potluck.errors.ConfigError` naming the source and line.

Keys are held only as SHA-256 digests; a presented key is hashed and compared with
:func:`hmac.compare_digest` against every known digest (no early exit), so neither the
comparison nor the loop leaks which bytes or which key matched.

Revocation: the keys file is re-read whenever it changes (its inode, size or modification time
differ from the last read, checked on every authenticated request with one ``stat``), so removing
a line revokes that key for the next request; no signal or restart is needed. A file that
becomes unreadable or invalid revokes every key it held (fail closed) until it is fixed. A file
readable by other users logs a warning (``chmod 600`` it).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from potluck.errors import ConfigError
from potluck.routing.scopes import ALL_SCOPES

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 16
_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")
KEYGEN_HINT = "python -c 'import secrets; print(\"sk-\" + secrets.token_urlsafe(24))'"


@dataclass(frozen=True)
class Rate:
    """A request budget: ``count`` requests per ``period_s`` seconds."""

    count: float
    period_s: float

    @property
    def per_s(self) -> float:
        return self.count / self.period_s


def parse_rate(text: str, where: str = "rate") -> Rate:
    """``"60/min"`` -> ``Rate(60, 60.0)``. Units: ``s``/``sec``/``second``, ``min``/``minute``, ``h``/``hour``.

    Raises:
        ConfigError: not ``N/unit`` with ``N > 0`` and a known unit (message names ``where``).
    """
    m = _RATE.match(text.lower())
    if m is None or m.group(2) not in _PERIODS or float(m.group(1)) <= 0:
        raise ConfigError(f"{where}: {text!r} is not a rate like 60/min (N > 0 per s, min or h)")
    return Rate(float(m.group(1)), _PERIODS[m.group(2)])


@dataclass(frozen=True)
class ApiKey:
    """One accepted key, without the key itself.

    Attributes:
        digest: SHA-256 of the key (32 bytes).
        scopes: what it may do beyond plain completions.
        rate: its request budget, ``None``: the default (``api_rate_limit``).
        name: a label for logs (``name=`` or ``<source>:<line>``); never the key.
    """

    digest: bytes
    scopes: frozenset[str]
    rate: Rate | None
    name: str

    @property
    def key_id(self) -> str:
        """A short, stable, non-secret id (first 12 hex digits of the digest) for logs and buckets."""
        return self.digest.hex()[:12]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_key_line(line: str, where: str) -> ApiKey | None:
    """One key entry (module docstring grammar); ``None`` for a blank or comment line.

    Raises:
        ConfigError: the entry is malformed (the message names ``where``, never the key).
    """
    fields = line.split("#", 1)[0].split()
    if not fields:
        return None
    key, attrs = fields[0], fields[1:]
    if "=" in key and len(key) < MIN_KEY_CHARS:
        raise ConfigError(f"{where}: the line must start with the key, not {key.split('=')[0]}=")
    if len(key) < MIN_KEY_CHARS:
        raise ConfigError(
            f"{where}: the key is {len(key)} characters, fewer than {MIN_KEY_CHARS}; make one with {KEYGEN_HINT}"
        )
    scopes: frozenset[str] = frozenset()
    rate: Rate | None = None
    name = where
    for attr in attrs:
        label, sep, value = attr.partition("=")
        if not sep or not value:
            raise ConfigError(f"{where}: {attr!r} is not attribute=value (scopes=, rate= or name=)")
        if label == "scopes":
            wanted = {s.strip() for s in value.split(",") if s.strip()}
            unknown = wanted - ALL_SCOPES - {"*"}
            if unknown:
                known = ", ".join(sorted(ALL_SCOPES))
                raise ConfigError(f"{where}: unknown scope {sorted(unknown)[0]!r} (known: {known}, or *)")
            scopes = ALL_SCOPES if "*" in wanted else frozenset(wanted)
        elif label == "rate":
            rate = parse_rate(value, f"{where}: rate")
        elif label == "name":
            name = value
        else:
            raise ConfigError(f"{where}: unknown attribute {label!r} (scopes=, rate= or name=)")
    return ApiKey(_digest(key), scopes, rate, name)


def parse_keys(lines: Iterable[str], source: str) -> list[ApiKey]:
    """Every key entry of ``lines`` (``source`` names them in errors: ``<source>:<line number>``).

    Raises:
        ConfigError: a malformed entry, or the same key twice.
    """
    keys: list[ApiKey] = []
    for n, line in enumerate(lines, 1):
        key = parse_key_line(line, f"{source}:{n}")
        if key is None:
            continue
        if any(hmac.compare_digest(key.digest, k.digest) for k in keys):
            raise ConfigError(f"{source}:{n}: the same key appears twice")
        keys.append(key)
    return keys


def split_entries(text: str) -> list[str]:
    """``POTLUCK_API_KEYS``' format: entries separated by ``;`` or newlines."""
    return [e for e in re.split(r"[;\n]", text) if e.strip()]


class KeyFile:
    """A keys file, re-read when it changes (see module docstring).

    Raises (constructor):
        ConfigError: the file is missing, unreadable or invalid at start (the node does not start).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int, int] | None = None
        self._keys: list[ApiKey] = []
        st = self._stat()
        if st is None:
            raise ConfigError(f"API keys file {path} does not exist or cannot be read")
        self._keys = self._read(st)

    def _stat(self) -> os.stat_result | None:
        try:
            return self.path.stat()
        except OSError:
            return None

    def _read(self, st: os.stat_result) -> list[ApiKey]:
        self._stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "API keys file %s is accessible to other users (mode %o); chmod 600 it", self.path, st.st_mode & 0o777
            )
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read API keys file {self.path}: {exc}") from exc
        return parse_keys(text.splitlines(), str(self.path))

    def keys(self) -> list[ApiKey]:
        """The file's keys now: re-read if it changed; none while it is missing or invalid."""
        st = self._stat()
        if st is None:
            if self._stamp is not None:
                log.error("API keys file %s disappeared: its keys are revoked until it is back", self.path)
            self._stamp, self._keys = None, []
            return self._keys
        if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self._stamp:
            try:
                self._keys = self._read(st)
                log.info("API keys file %s reloaded: %d key(s)", self.path, len(self._keys))
            except ConfigError as exc:
                log.error("%s; its keys are revoked until it is fixed", exc)
                self._keys = []
        return self._keys


class KeyRing:
    """Every accepted key: fixed ones (flags, env, config) and a :class:`KeyFile`'s.

    Args:
        fixed: keys from ``--api-key`` / ``POTLUCK_API_KEYS`` / the config file.
        file: the keys file, if one was given.
    """

    def __init__(self, fixed: Sequence[ApiKey] = (), file: KeyFile | None = None) -> None:
        self.fixed = list(fixed)
        self.file = file

    @property
    def configured(self) -> bool:
        """Were keys configured at all? (Then every protected route needs one, even if the file empties.)"""
        return bool(self.fixed) or self.file is not None

    def lookup(self, presented: str) -> ApiKey | None:
        """The key matching ``presented``, or ``None``; constant time in the key's bytes."""
        digest = _digest(presented)
        found: ApiKey | None = None
        for key in [*self.fixed, *(self.file.keys() if self.file is not None else ())]:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found
