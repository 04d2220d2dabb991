"""API keys: the key file, authentication of a presented key, reload without restart.

The file holds one key per line as ``NAME:SHA256HEX`` (the hex sha256 of the key's text); ``#``
starts a comment, blank lines are ignored. Only hashes are stored, so the file is not a secret
worth stealing. A session's owner is derived from the hash of the key that created it (never
from the name: two keys with one name are two owners, and a rotated key is a new owner).

Reloading: ``KeyRing.maybe_reload()`` re-reads the file when its modification time, size or
inode changed (checked at most every ``check_interval_s``), and ``reload()`` forces it (SIGHUP).
A file that became unreadable or invalid keeps the last good keys and logs the error: a typo in
a deployment must not lock every client out.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KEY_PREFIX = "co_"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
OWNER_HEX_CHARS = 32  # 128 bits of the key's hash name its owner namespace


class KeyFileError(ValueError):
    """The key file cannot be read or a line is malformed; the message names the line."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    sha256: str

    @property
    def owner(self) -> str:
        """The namespace of the sessions this key creates (part of the stored id)."""
        return self.sha256[:OWNER_HEX_CHARS]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_line(name: str, key: str) -> str:
    """The line to add to the key file for ``key``."""
    if not NAME.match(name):
        raise KeyFileError(f"key name {name!r} must be 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit")
    return f"{name}:{hash_key(key)}"


def parse_key_file(text: str, source: str = "key file") -> dict[str, ApiKey]:
    """``{sha256: ApiKey}``; raises ``KeyFileError`` naming the first bad line."""
    keys: dict[str, ApiKey] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, digest = line.partition(":")
        name, digest = name.strip(), digest.strip().lower()
        if not sep or not NAME.match(name) or not HEX64.match(digest):
            raise KeyFileError(f"{source} line {number}: expected NAME:SHA256HEX (64 hex digits), got {raw.strip()!r}")
        keys[digest] = ApiKey(name, digest)
    return keys


class KeyRing:
    """The configured keys; thread-safe, cheap to query on every request."""

    def __init__(self, path: Path, *, check_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._keys: dict[str, ApiKey] = {}
        self._signature: tuple[int, int, int] | None = None
        self._load(strict=True)
        self._checked = time.monotonic()  # the interval runs from this load, not from the clock's zero

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, presented: str) -> ApiKey | None:
        """The key whose hash matches ``presented``, or None."""
        self.maybe_reload()
        digest = hash_key(presented)
        found = self._keys.get(digest)
        # The dict lookup is on a hash of the secret, so its timing reveals nothing about the key;
        # compare_digest keeps the final equality constant-time all the same.
        if found is not None and hmac.compare_digest(found.sha256, digest):
            return found
        return None

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.check_interval_s:
            return
        self._checked = now
        if self._stat() != self._signature:
            self._load(strict=False)

    def reload(self) -> None:
        self._load(strict=False)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, *, strict: bool) -> None:
        with self._lock:
            signature = self._stat()
            try:
                keys = parse_key_file(self.path.read_text(), str(self.path))
            except (OSError, UnicodeDecodeError, KeyFileError) as e:
                if strict:
                    raise KeyFileError(f"cannot load API keys from {self.path}: {e}") from None
                log.error("API key file %s not reloaded, keeping %d keys: %s", self.path, len(self._keys), e)
                self._signature = signature
                return
            if not keys and strict:
                raise KeyFileError(f"API key file {self.path} holds no keys")
            if self._signature is not None:
                log.info("API keys reloaded from %s: %d keys", self.path, len(keys))
            self._keys, self._signature = keys, signature
