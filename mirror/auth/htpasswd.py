"""auth.htpasswd: bcrypt entries as `htpasswd -B` writes them, re-read when the file changes.

Docker sends Basic credentials with every request, and bcrypt costs tens of milliseconds by design,
so a password that verified is remembered (by its SHA-256, never in clear) for as long as the
user's entry in the file stays the same. Wrong passwords are never remembered: each costs bcrypt.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
from dataclasses import dataclass

import bcrypt

log = logging.getLogger("mirror.auth")

BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
MAX_REMEMBERED = 4096


class HtpasswdError(Exception):
    """The file cannot be read (at start: mirror refuses to run without it)."""


@dataclass(frozen=True, slots=True)
class _Stamp:
    mtime_ns: int
    size: int
    inode: int


def parse(text: str, source: str = "htpasswd") -> dict[str, bytes]:
    """`user:hash` lines -> {user: bcrypt hash}. Blank lines and `#` comments are skipped; entries
    that are not bcrypt (MD5, SHA1, crypt) are skipped with a warning, as registry:2 refuses them."""
    entries: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            log.warning("%s line %d: not user:hash, skipped", source, number)
            continue
        if not hashed.startswith(BCRYPT_PREFIXES):
            log.warning("%s line %d: user %s has no bcrypt hash (htpasswd -B), skipped", source, number, user)
            continue
        entries[user] = hashed.encode()
    return entries


class Htpasswd:
    """The users of one htpasswd file. `check()` verifies a user's password; the file is stat'ed on
    every check and re-read when its mtime, size or inode changed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: _Stamp | None = None
        self._entries: dict[str, bytes] = {}
        self._verified: dict[tuple[str, bytes], bytes] = {}  # (user, sha256(password)) -> the entry it matched
        self._by_header: dict[bytes, tuple[str, bytes]] = {}  # sha256(Basic credentials) -> (user, entry)
        self._reload(required=True)

    def _reload(self, required: bool = False) -> None:
        try:
            st = os.stat(self.path)
            stamp = _Stamp(st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            if required:
                raise HtpasswdError(f"auth.htpasswd.path: cannot read {self.path}: {e.strerror}") from None
            if self._stamp is not None:  # keep the users we have; say so once per change
                log.warning("htpasswd %s unreadable (%s): keeping the %d users read before",
                            self.path, e.strerror, len(self._entries))
                self._stamp = None
            return
        self._entries = parse(text, self.path)
        self._verified.clear()
        self._by_header.clear()
        self._stamp = stamp
        log.info("htpasswd %s: %d users", self.path, len(self._entries))

    @property
    def users(self) -> list[str]:
        return sorted(self._entries)

    async def check_basic(self, credentials: str) -> str | None:
        """The user whose Basic `credentials` (base64 of user:password) verify, else None; ValueError
        when they are not base64 of user:password. Credentials seen before cost one lookup."""
        self._reload()
        key = hashlib.sha256(credentials.encode()).digest()
        hit = self._by_header.get(key)
        if hit is not None and self._entries.get(hit[0]) is hit[1]:
            return hit[0]
        user, sep, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        if not sep:
            raise ValueError("Basic credentials are not user:password")
        if not await self.check(user, password):
            return None
        if len(self._by_header) >= MAX_REMEMBERED:
            self._by_header.clear()
        self._by_header[key] = (user, self._entries[user])
        return user

    async def check(self, user: str, password: str) -> bool:
        self._reload()
        entry = self._entries.get(user)
        if entry is None:
            return False
        key = (user, hashlib.sha256(password.encode()).digest())
        if self._verified.get(key) == entry:
            return True
        ok = await asyncio.to_thread(_checkpw, password.encode(), entry)
        if ok:
            if len(self._verified) >= MAX_REMEMBERED:
                self._verified.clear()
            self._verified[key] = entry
        return ok


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a malformed hash in the file
        return False
