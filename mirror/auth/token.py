"""auth.token: verify Bearer JWTs as distribution does (Docker token authentication spec).

A token is trusted when its signing key is: the header's `x5c` chain ends in a certificate of the
root bundle (the leaf may be a bundle certificate itself), or its `kid` names the key of a bundle
certificate (RFC 7638 thumbprint, as distribution 3, or the libtrust key id of distribution 2).
Then `iss` must be the configured issuer, `aud` the service, `exp`/`nbf` hold (60 s leeway, as
distribution). The `access` claim is what the token grants. Verified tokens are remembered until
they expire, so the hot path does one dictionary lookup, not an RSA verification.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mirror.config import TokenConfig

LEEWAY = 60.0
MAX_CHAIN = 8
MAX_REMEMBERED = 10_000

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class InvalidToken(Exception):
    """Malformed, untrusted, expired or meant for someone else: the client needs a new token."""


class TokenSetupError(Exception):
    """The root certificate bundle cannot be used (at start)."""


@dataclass(frozen=True, slots=True)
class Grants:
    """What a verified token allows: (type, name) -> actions ("*" = every action)."""

    subject: str
    access: dict[tuple[str, str], frozenset[str]]
    expires: float

    def allows(self, kind: str, name: str, action: str) -> bool:
        actions = self.access.get((kind, name))
        return actions is not None and (action in actions or "*" in actions)


def load_bundle(path: str) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TokenSetupError(f"auth.token.rootcertbundle: cannot read {path}: {e.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TokenSetupError(f"auth.token.rootcertbundle: {path} holds no PEM certificates ({e})") from None
    for cert in certs:
        if not isinstance(cert.public_key(), rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise TokenSetupError(f"auth.token.rootcertbundle: {cert.subject.rfc4514_string()}: "
                                  f"only RSA and EC keys sign tokens")
    return certs


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rfc7638_thumbprint(key: PublicKey) -> str:
    """The JWK thumbprint distribution 3 uses as `kid` for bundle certificates."""
    if isinstance(key, rsa.RSAPublicKey):
        n = key.public_numbers()
        members: dict[str, str] = {"e": _b64url(n.e.to_bytes((n.e.bit_length() + 7) // 8, "big")), "kty": "RSA",
                                   "n": _b64url(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big"))}
    else:
        numbers = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        members = {"crv": {256: "P-256", 384: "P-384", 521: "P-521"}[key.curve.key_size], "kty": "EC",
                   "x": _b64url(numbers.x.to_bytes(size, "big")), "y": _b64url(numbers.y.to_bytes(size, "big"))}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64url(hashlib.sha256(canonical).digest())


def libtrust_key_id(key: PublicKey) -> str:
    """distribution 2's `kid`: base32 of the first 240 bits of SHA-256(DER SubjectPublicKeyInfo), in
    12 groups of 4 joined by ':'."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(b32[i:i + 4] for i in range(0, 48, 4))


class TokenVerifier:
    def __init__(self, config: TokenConfig) -> None:
        self.config = config
        self.roots = load_bundle(config.rootcertbundle)
        self._root_der = {c.public_bytes(serialization.Encoding.DER) for c in self.roots}
        self.keys: dict[str, PublicKey] = {}
        for cert in self.roots:
            key = cert.public_key()
            assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
            self.keys[rfc7638_thumbprint(key)] = key
            self.keys[libtrust_key_id(key)] = key
        self.algorithms = list(config.signingalgorithms)
        self._verified: dict[str, Grants] = {}

    def verify(self, token: str, now: float | None = None) -> Grants:
        now = time.time() if now is None else now
        grants = self._verified.get(token)
        if grants is not None:
            if grants.expires + LEEWAY >= now:
                return grants
            del self._verified[token]
        grants = self._verify(token, now)
        if len(self._verified) >= MAX_REMEMBERED:
            self._verified = {t: g for t, g in self._verified.items() if g.expires + LEEWAY >= now}
            if len(self._verified) >= MAX_REMEMBERED:
                self._verified.clear()
        self._verified[token] = grants
        return grants

    def _verify(self, token: str, now: float) -> Grants:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise InvalidToken(f"signing algorithm {alg!r} is not accepted")
        key = self._signing_key(header, now)
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key=key, algorithms=[alg], audience=self.config.service, issuer=self.config.issuer,
                options={"require": ["exp", "iss", "aud"], "verify_iat": False, "verify_exp": False,
                         "verify_nbf": False})
        except jwt.InvalidAudienceError:
            raise InvalidToken("token meant for another service") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("token from an untrusted issuer") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("token signature does not verify") from None
        except jwt.PyJWTError as e:
            raise InvalidToken(f"invalid token: {e}") from None
        exp, nbf = claims.get("exp"), claims.get("nbf", 0)
        if not isinstance(exp, int | float) or not isinstance(nbf, int | float):
            raise InvalidToken("exp and nbf must be numbers")
        if now > exp + LEEWAY:  # checked here, against `now`, rather than by PyJWT against its clock
            raise InvalidToken("token expired")
        if now < nbf - LEEWAY:
            raise InvalidToken("token not valid yet")
        return Grants(subject=str(claims.get("sub") or ""), access=_access(claims.get("access")), expires=float(exp))

    def _signing_key(self, header: dict[str, Any], now: float) -> PublicKey:
        x5c = header.get("x5c")
        if x5c:
            return self._chain_key(x5c, now)
        kid = header.get("kid")
        if isinstance(kid, str) and kid:
            key = self.keys.get(kid)
            if key is None:
                raise InvalidToken("token signed by an untrusted key")
            return key
        raise InvalidToken("token names no signing key (x5c or kid)")

    def _chain_key(self, x5c: Any, now: float) -> PublicKey:
        """The leaf's key, once the chain leads to a bundle certificate (dates checked on the way)."""
        if not isinstance(x5c, list) or not 0 < len(x5c) <= MAX_CHAIN or not all(isinstance(c, str) for c in x5c):
            raise InvalidToken("malformed x5c chain")
        try:
            chain = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c]
        except (ValueError, binascii.Error):
            raise InvalidToken("malformed certificate in x5c") from None
        at = dt.datetime.fromtimestamp(now, dt.UTC)
        candidates = chain[1:] + self.roots
        cert = chain[0]
        for _ in range(MAX_CHAIN + 1):
            if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
                raise InvalidToken("a certificate of the x5c chain is expired or not valid yet")
            if cert.public_bytes(serialization.Encoding.DER) in self._root_der:
                key = chain[0].public_key()
                if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                    raise InvalidToken("unsupported key type in x5c")
                return key
            cert = _issuer(cert, candidates)
        raise InvalidToken("x5c chain is too long")


def _issuer(cert: x509.Certificate, candidates: Iterable[x509.Certificate]) -> x509.Certificate:
    for candidate in candidates:
        if candidate.subject != cert.issuer or candidate == cert or not _is_ca(candidate):
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    raise InvalidToken("x5c chain does not lead to a certificate of the root bundle")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _access(raw: Any) -> dict[tuple[str, str], frozenset[str]]:
    access: dict[tuple[str, str], set[str]] = {}
    if not isinstance(raw, list):
        return {}
    for entry in raw:
        if not isinstance(entry, dict):
            continue
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
        if isinstance(kind, str) and isinstance(name, str) and isinstance(actions, list):
            access.setdefault((kind, name), set()).update(a for a in actions if isinstance(a, str))
    return {k: frozenset(v) for k, v in access.items()}
