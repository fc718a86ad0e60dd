"""Keys, certificates and tokens for the auth tests: a CA that signs an intermediate that signs a
token-signing leaf (RSA or EC), and a Docker-token-spec JWT minted with any of them."""

from __future__ import annotations

import base64
import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ISSUER = "test-issuer"
SERVICE = "test-registry"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass
class Signer:
    key: PrivateKey
    cert: x509.Certificate

    @property
    def der_b64(self) -> str:
        return base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def new_key(kind: str) -> PrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa" else \
        ec.generate_private_key(ec.SECP256R1())


def certificate(name: str, key: PrivateKey, issuer: Signer | None = None, ca: bool = True, days: int = 30,
                san: list[x509.GeneralName] | None = None, client: bool = False) -> Signer:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.cert.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                                        critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Signer(key, cert)


@dataclass
class TokenPKI:
    root: Signer
    intermediate: Signer
    leaf: Signer  # signed by the intermediate, not in the bundle itself

    def bundle(self, path: Path) -> Path:
        path.write_bytes(self.root.pem)
        return path


def make_pki(kind: str = "rsa") -> TokenPKI:
    root = certificate("test token root", new_key(kind))
    intermediate = certificate("test token intermediate", new_key(kind), issuer=root)
    leaf = certificate("test token signer", new_key(kind), issuer=intermediate, ca=False)
    return TokenPKI(root, intermediate, leaf)


def mint(signer: Signer, access: list[dict[str, Any]], *, sub: str = "alice", aud: str = SERVICE,
         iss: str = ISSUER, expires_in: float = 300, nbf_offset: float = -10, chain: list[Signer] | None = None,
         kid: str | None = None, alg: str | None = None) -> str:
    """A token signed by `signer`, with `x5c` = [signer, *chain] unless `kid` is given."""
    now = time.time()
    claims = {"iss": iss, "sub": sub, "aud": aud, "exp": int(now + expires_in), "nbf": int(now + nbf_offset),
              "iat": int(now), "jti": "j", "access": access}
    if alg is None:
        alg = "RS256" if isinstance(signer.key, rsa.RSAPrivateKey) else "ES256"
    headers: dict[str, Any] = {"typ": "JWT"}
    if kid is not None:
        headers["kid"] = kid
    else:
        headers["x5c"] = [signer.der_b64, *(c.der_b64 for c in chain or [])]
    return jwt.encode(claims, signer.key, algorithm=alg, headers=headers)


def repo(name: str, *actions: str) -> dict[str, Any]:
    return {"type": "repository", "name": name, "actions": list(actions)}
