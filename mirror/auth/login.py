"""The web UI's login with token auth: the browser sends a registry user's Basic credentials (its own
prompt, as with htpasswd), and the mirror asks the token realm for a token with them, as `docker
login` does: `GET <realm>?service=<service>&account=<user>&scope=...` with Basic auth. The token is
verified like any Bearer token (signature chain to the root bundle, issuer, service) and what it
grants is what the user may do in the UI; a repository's page asks for that repository's scopes.

Passwords are never kept: the browser sends them with every page, and a token a pair of credentials
got is remembered under their SHA-256 until it expires, so pages cost a dictionary lookup, not a
round trip to the realm. Wrong credentials are never remembered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import time
from dataclasses import dataclass

import aiohttp

from mirror.auth.token import LEEWAY, Grants, InvalidToken, TokenVerifier

log = logging.getLogger("mirror.auth")
TIMEOUT = aiohttp.ClientTimeout(total=10)
MAX_REMEMBERED = 10_000
CATALOG = "registry:catalog:*"  # what a login asks for: the list, as /v2/_catalog would show it


class LoginFailed(Exception):
    """The realm refused the credentials (the browser should ask again)."""


class RealmUnavailable(Exception):
    """The realm could not be asked, or answered with something that is not a token we trust."""


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str

    @classmethod
    def from_basic(cls, encoded: str) -> Credentials:
        """`Authorization: Basic <encoded>`'s user and password; ValueError if malformed."""
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError("malformed Basic credentials") from None
        if not sep or not user:
            raise ValueError("malformed Basic credentials")
        return cls(user, password)

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

    def key(self, realm: str, scopes: tuple[str, ...]) -> str:
        return hashlib.sha256("\0".join((realm, self.user, self.password, *scopes)).encode()).hexdigest()


class TokenLogin:
    """Tokens for UI users, from the realm, remembered until they expire."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self.verifier = verifier
        self.service = verifier.config.service
        self._session: aiohttp.ClientSession | None = None
        self._grants: dict[str, Grants] = {}

    async def grants(self, realm: str, credentials: Credentials, scopes: tuple[str, ...]) -> Grants:
        """What the realm grants `credentials` of `scopes` (at least the user's name: `subject`)."""
        key = credentials.key(realm, scopes)
        found = self._grants.get(key)
        if found is not None and found.expires - LEEWAY > time.time():
            return found
        grants = await self._ask(realm, credentials, scopes)
        if len(self._grants) >= MAX_REMEMBERED:
            now = time.time()
            self._grants = {k: g for k, g in self._grants.items() if g.expires - LEEWAY > now}
            if len(self._grants) >= MAX_REMEMBERED:
                self._grants.clear()
        self._grants[key] = grants
        return grants

    async def _ask(self, realm: str, credentials: Credentials, scopes: tuple[str, ...]) -> Grants:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=TIMEOUT)
        query = [("service", self.service), ("account", credentials.user), *(("scope", s) for s in scopes)]
        try:
            async with self._session.get(realm, params=query, headers={"Authorization": credentials.basic()}) as r:
                if r.status == 401:
                    log.info("UI login of %s refused by the token realm", credentials.user)
                    raise LoginFailed("invalid username or password")
                if r.status != 200:
                    raise RealmUnavailable(f"the token realm {realm} answered {r.status}")
                doc = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise RealmUnavailable(f"the token realm {realm} could not be asked: {type(e).__name__}: {e}") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str):
            raise RealmUnavailable(f"the token realm {realm} answered without a token")
        try:
            grants = self.verifier.verify(token)
        except InvalidToken as e:
            raise RealmUnavailable(f"the token realm {realm} gave a token mirror does not trust: {e}") from None
        if grants.subject != credentials.user:  # a realm that ignores credentials must not log anyone in
            raise LoginFailed(f"the token realm issued the token to {grants.subject or 'nobody'}, "
                              f"not {credentials.user}")
        return grants

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
