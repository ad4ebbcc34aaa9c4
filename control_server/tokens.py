"""The token file: bearer tokens by name and role, stored as SHA-256 digests.

The file is JSON (YAML when its name ends in .yaml/.yml; either is read
whatever the name), written by ``control-server token create``::

    {"tokens": [{"name": "gpu-node-7", "role": "trainer",
                 "sha256": "<hex digest of the token>",
                 "created_at": "2025-01-31T12:00:00+00:00"}]}

Only SHA-256 digests are stored: tokens are 32 random bytes, so an unsalted
hash cannot be brute-forced, and a stolen file grants nothing. `TokenTable`
re-reads the file when it changes, so ``token create`` and ``token revoke``
take effect without a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from control_server.auth import Role

__all__ = [
    "AuthFileError",
    "TokenEntry",
    "TokenTable",
    "check_name",
    "create_token",
    "hash_token",
    "load_tokens",
    "revoke_token",
]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ENTRY_KEYS = frozenset({"name", "role", "sha256", "created_at"})


class AuthFileError(ValueError):
    """The token file is missing, unreadable or malformed; the message names file and entry."""


@dataclass(frozen=True)
class TokenEntry:
    """One token: who it belongs to, what it may do, and the digest it is checked against."""

    #: The actor recorded for calls made with the token.
    name: str
    role: Role
    #: Hex SHA-256 of the token; the token itself is never stored.
    sha256: str
    created_at: datetime

    def to_json(self) -> dict[str, str]:
        """The entry as stored in the file."""
        return {
            "name": self.name,
            "role": self.role.value,
            "sha256": self.sha256,
            "created_at": self.created_at.isoformat(),
        }


def hash_token(token: str) -> str:
    """The hex SHA-256 digest a token is stored and looked up by."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    """Return `name` if it is a valid token name, else raise ValueError."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            "name must be 1-64 characters of letters, digits and ._@+- (starting with a "
            f"letter or digit), but got {name!r}."
        )
    return name


def load_tokens(path: Path) -> list[TokenEntry]:
    """Read and validate a token file; raise AuthFileError naming the file and entry."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AuthFileError(
            f"auth file {path} does not exist; create it with "
            f"`control-server token create --auth-file {path} ...`"
        ) from None
    except OSError as error:
        raise AuthFileError(f"auth file {path}: cannot read it: {error.strerror}") from None
    if not text.strip():
        return []  # an empty file (touched to set its permissions first) has no tokens
    data = _parse(path, text)
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
        raise AuthFileError(f'auth file {path}: expected an object {{"tokens": [...]}}')
    entries: list[TokenEntry] = []
    names: set[str] = set()
    digests: set[str] = set()
    for index, raw in enumerate(data["tokens"]):
        entry = _parse_entry(path, index, raw)
        where = f"auth file {path}: entry {index} ({entry.name!r})"
        if entry.name in names:
            raise AuthFileError(f"{where}: the name is used by an earlier entry")
        if entry.sha256 in digests:
            raise AuthFileError(f"{where}: the sha256 is used by an earlier entry")
        names.add(entry.name)
        digests.add(entry.sha256)
        entries.append(entry)
    return entries


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def _parse(path: Path, text: str) -> Any:
    # JSON is what we write unless the name says YAML; read either, whatever the name
    # (a Docker secret is mounted as plain /run/secrets/NAME).
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise AuthFileError(f"auth file {path}: not valid JSON: {error}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise AuthFileError(f"auth file {path}: not valid YAML or JSON: {error}") from None


def _parse_entry(path: Path, index: int, raw: Any) -> TokenEntry:
    where = f"auth file {path}: entry {index}"
    if not isinstance(raw, dict):
        raise AuthFileError(f"{where}: expected an object with keys {sorted(_ENTRY_KEYS)}")
    if isinstance(raw.get("name"), str):
        where += f" ({raw['name']!r})"
    missing = sorted(_ENTRY_KEYS - raw.keys())
    unknown = sorted(raw.keys() - _ENTRY_KEYS)
    if missing or unknown:
        raise AuthFileError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    name, role, digest, created = (raw[k] for k in ("name", "role", "sha256", "created_at"))
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AuthFileError(f"{where}: name must be 1-64 characters of letters, digits, ._@+-")
    if role not in {r.value for r in Role}:
        raise AuthFileError(
            f"{where}: role must be one of {', '.join(r.value for r in Role)}, but got {role!r}"
        )
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise AuthFileError(f"{where}: sha256 must be 64 lowercase hex digits")
    try:
        # YAML reads an unquoted time as a datetime already.
        created_at = created if isinstance(created, datetime) else datetime.fromisoformat(created)
    except (TypeError, ValueError):
        raise AuthFileError(
            f"{where}: created_at must be an ISO 8601 time, but got {created!r}"
        ) from None
    return TokenEntry(name, Role(role), digest, created_at)


def _write_tokens(path: Path, entries: Sequence[TokenEntry]) -> None:
    """Replace the file atomically; it is created (and kept) readable by its owner only."""
    data = {"tokens": [e.to_json() for e in entries]}
    if _is_yaml(path):
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_or_empty(path: Path) -> list[TokenEntry]:
    return load_tokens(path) if path.exists() else []


def create_token(
    path: Path, name: str, role: Role, *, now: datetime | None = None
) -> tuple[str, TokenEntry]:
    """Add a new token for `name` to the file (created 0600 if absent).

    Returns the token, which exists nowhere else: show it once. Raises ValueError
    for a bad or already used name.
    """
    check_name(name)
    entries = _load_or_empty(path)
    if any(e.name == name for e in entries):
        raise ValueError(
            f"auth file {path} already has a token named {name!r}; revoke it first "
            "or pick another name."
        )
    token = secrets.token_urlsafe(32)
    entry = TokenEntry(name, Role(role), hash_token(token), now or datetime.now(UTC))
    _write_tokens(path, [*entries, entry])
    return token, entry


def revoke_token(path: Path, name: str) -> TokenEntry:
    """Remove the token named `name` from the file; raise ValueError if there is none."""
    entries = load_tokens(path)
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        raise ValueError(f"auth file {path} has no token named {name!r}.")
    _write_tokens(path, kept)
    return next(e for e in entries if e.name == name)


class TokenTable:
    """Token digests -> entries, re-read when the file changes (checked at most once a second).

    A file that turns invalid while serving is logged and ignored: the last
    valid table stays in force (``token create``/``revoke`` write atomically, so
    only a broken hand edit gets here).
    """

    def __init__(self, path: Path, *, recheck_s: float = 1.0) -> None:
        self._path = path
        self._recheck_s = recheck_s
        self._by_digest: dict[str, TokenEntry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = -float("inf")
        self._load(self._stat())

    @property
    def path(self) -> Path:
        """The token file."""
        return self._path

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, token: str) -> TokenEntry | None:
        """The entry of a presented token, or None when it is unknown or revoked."""
        now = time.monotonic()
        if now - self._checked >= self._recheck_s:
            self._checked = now
            self._reload_if_changed()
        return self._by_digest.get(hash_token(token))

    def _stat(self) -> os.stat_result:
        try:
            return self._path.stat()
        except OSError as error:
            raise AuthFileError(f"auth file {self._path}: {error.strerror}") from None

    def _load(self, st: os.stat_result) -> None:
        entries = load_tokens(self._path)
        self._by_digest = {e.sha256: e for e in entries}
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            logger.warning(
                "auth file %s is writable by group or others: they could grant themselves "
                "any role; chmod 600 it",
                self._path,
            )
        logger.info("auth file %s: %d tokens", self._path, len(entries))

    def _reload_if_changed(self) -> None:
        try:
            st = self._stat()
            if (st.st_ino, st.st_mtime_ns, st.st_size) != self._stamp:
                self._load(st)
        except AuthFileError as error:
            logger.error("%s; keeping the %d tokens loaded before", error, len(self))
