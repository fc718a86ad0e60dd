"""A Docker token-spec authorization server for distribution's `auth.token`, run as a process.

    python -m tests.support.tokenserver --port P --dir D [--user u:p ...] [--admin u ...] [--anonymous-pull]
        [--expires-in 300] [--issuer ...] [--service ...]

It issues RS256 JWTs whose header carries the signing certificate in `x5c`; the certificate is
self-signed and is also distribution's `auth.token.rootcertbundle`. `make_keys(dir)` writes the
key and certificate (`key.pem`, `cert.pem`) before either process starts.

`GET /token?service=..&scope=..` (Basic credentials optional) and the OAuth2 form `POST /token`
(grant_type=password) are both answered. Users given with --user get pull and push on every
repository; those also given with --admin get every action asked for (delete too) and
`registry:catalog:*`; anonymous requests get pull only with --anonymous-pull, else a token with no
access (distribution then answers 401). Wrong credentials get 401. One JSON line per token request
goes to stdout: {"method", "account", "scopes", "granted", "status"}, which tests count.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

ISSUER = "e2e-token-issuer"
SERVICE = "e2e-registry"


def make_keys(directory: Path) -> tuple[Path, Path]:
    """RSA key and a self-signed certificate for it -> (key.pem, cert.pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "e2e token signer")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def distribution_auth(realm: str, cert_path: Path, issuer: str = ISSUER, service: str = SERVICE) -> dict[str, Any]:
    """The `auth:` section of distribution's config for this server."""
    return {"auth": {"token": {"realm": realm, "service": service, "issuer": issuer,
                               "rootcertbundle": str(cert_path)}}}


def parse_scope(scope: str) -> dict[str, Any] | None:
    """`repository:library/alpine:pull,push` -> access entry (None if malformed)."""
    parts = scope.split(":")
    if len(parts) < 3:
        return None
    kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1]
    if "(" in kind:  # repository(plugin)
        kind = kind.split("(", 1)[0]
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


class TokenServer:
    def __init__(self, key_pem: bytes, cert_pem: bytes, users: dict[str, str], anonymous_pull: bool,
                 expires_in: int, issuer: str, service: str, admins: frozenset[str] = frozenset()) -> None:
        self.key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
        self.x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.users = users
        self.admins = admins
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.issuer = issuer
        self.service = service

    def record(self, **fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    def account(self, request: web.Request, form: dict[str, str]) -> tuple[str | None, bool]:
        """-> (account or None for anonymous, credentials ok)."""
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None, False
            return user, self.users.get(user) == password
        if form.get("grant_type") == "password":
            user, password = form.get("username", ""), form.get("password", "")
            return user, self.users.get(user) == password
        return None, True

    async def token(self, request: web.Request) -> web.Response:
        form: dict[str, str] = {}
        scopes = list(request.query.getall("scope", []))
        service = request.query.get("service", "")
        if request.method == "POST":
            post = await request.post()
            form = {k: str(v) for k, v in post.items()}
            scopes += [s for v in post.getall("scope", []) for s in str(v).split(" ") if s]
            service = form.get("service", service)
        account, ok = self.account(request, form)
        if not ok:
            self.record(method=request.method, account=account, scopes=scopes, granted=[], status=401)
            return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                                     status=401, headers={"WWW-Authenticate": 'Basic realm="e2e-token"'})
        access = []
        admin = account in self.admins
        for scope in scopes:
            entry = parse_scope(scope)
            if entry is None or entry["type"] not in ("repository", "registry"):
                continue
            if entry["type"] == "registry":
                allowed = {"*"} if admin and entry["name"] == "catalog" else set()
            elif admin:
                allowed = set(entry["actions"])
            else:
                allowed = {"pull", "push"} if account else ({"pull"} if self.anonymous_pull else set())
            actions = [a for a in entry["actions"] if a in allowed]
            if actions:
                access.append({**entry, "actions": actions})
        now = int(dt.datetime.now(dt.UTC).timestamp())
        claims = {"iss": self.issuer, "sub": account or "", "aud": service or self.service,
                  "exp": now + self.expires_in, "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex,
                  "access": access}
        token = jwt.encode(claims, self.key, algorithm="RS256",  # type: ignore[arg-type]
                           headers={"x5c": self.x5c, "typ": "JWT"})
        self.record(method=request.method, account=account, scopes=scopes, granted=access, status=200)
        issued = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return web.json_response({"token": token, "access_token": token, "expires_in": self.expires_in,
                                  "issued_at": issued})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("GET", "/token", self.token)
        app.router.add_route("POST", "/token", self.token)
        app.router.add_route("GET", "/healthz", self.health)
        return app


class TokenServerProc:
    """The token server as a process started by a test; `requests()` are its logged token requests."""

    def __init__(self, tmp: Path, users: dict[str, str], anonymous_pull: bool = False, expires_in: int = 300,
                 admins: tuple[str, ...] = ()) -> None:
        from tests.support.procs import REPO_ROOT, Proc, client_env, free_port

        self.dir = Path(tmp)
        self.key_path, self.cert_path = make_keys(self.dir)
        self.port = free_port()
        argv = [sys.executable, "-m", "tests.support.tokenserver", "--port", str(self.port), "--dir", str(self.dir),
                "--expires-in", str(expires_in)]
        argv += [a for user, password in users.items() for a in ("--user", f"{user}:{password}")]
        argv += [a for admin in admins for a in ("--admin", admin)]
        if anonymous_pull:
            argv.append("--anonymous-pull")
        env = client_env({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)})
        self.proc = Proc("tokenserver", argv, self.dir, env=env, cwd=REPO_ROOT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def distribution_auth(self) -> dict[str, Any]:
        return distribution_auth(self.realm, self.cert_path)

    def start(self) -> TokenServerProc:
        from tests.support.procs import http

        self.proc.start()
        self.proc.wait_ready(lambda: http("GET", f"{self.url}/healthz", timeout=2).status == 200, 30)
        return self

    def stop(self) -> None:
        self.proc.stop()

    def requests(self) -> list[dict[str, Any]]:
        out = []
        for line in self.proc.stdout_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "status" in entry:
                out.append(entry)
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tokenserver")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", type=Path, required=True, help="holds key.pem and cert.pem (see make_keys)")
    p.add_argument("--user", action="append", default=[], help="user:password (repeatable)")
    p.add_argument("--admin", action="append", default=[], help="a --user granted everything (repeatable)")
    p.add_argument("--anonymous-pull", action="store_true")
    p.add_argument("--expires-in", type=int, default=300)
    p.add_argument("--issuer", default=ISSUER)
    p.add_argument("--service", default=SERVICE)
    args = p.parse_args(argv)
    users = dict(u.split(":", 1) for u in args.user)
    server = TokenServer((args.dir / "key.pem").read_bytes(), (args.dir / "cert.pem").read_bytes(), users,
                         args.anonymous_pull, args.expires_in, args.issuer, args.service, frozenset(args.admin))
    print(json.dumps({"msg": "listening", "port": args.port}), flush=True)
    web.run_app(server.app(), host="127.0.0.1", port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
