"""Unit tests of mirror/auth: the htpasswd parser and its reload, token verification (x5c chains,
kid, RS256/ES256, claims) and the access rules."""

from __future__ import annotations

import os
import time
from pathlib import Path

import bcrypt
import jwt
import pytest

from mirror.auth.access import AccessRules
from mirror.auth.htpasswd import Htpasswd, HtpasswdError, parse
from mirror.auth.token import InvalidToken, TokenSetupError, TokenVerifier, libtrust_key_id, rfc7638_thumbprint
from mirror.config import AccessConfig, AccessRule, TokenConfig
from tests.auth_keys import ISSUER, SERVICE, certificate, make_pki, mint, new_key, repo


def entry(user: str, password: str, prefix: str = "$2b$") -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    return f"{user}:{prefix}{hashed[4:]}"


# --- htpasswd -----------------------------------------------------------------------------------

def test_htpasswd_parse_keeps_bcrypt_entries_only() -> None:
    text = "\n".join(["# comment", "", entry("alice", "a"), entry("bob", "b", "$2y$"),
                      "carol:$apr1$abc$def", "dave:{SHA}xyz=", "no-colon-here", " "])
    entries = parse(text)
    assert sorted(entries) == ["alice", "bob"]
    assert entries["bob"].startswith(b"$2y$")


async def test_htpasswd_check_and_2y_entries(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(entry("alice", "secret") + "\n" + entry("bob", "pw", "$2y$") + "\n")
    h = Htpasswd(str(path))
    assert await h.check("alice", "secret")
    assert await h.check("alice", "secret")  # remembered
    assert not await h.check("alice", "Secret")
    assert not await h.check("nobody", "secret")
    assert await h.check("bob", "pw")
    assert h.users == ["alice", "bob"]


async def test_htpasswd_reloads_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(entry("alice", "old") + "\n")
    h = Htpasswd(str(path))
    assert await h.check("alice", "old")
    # same size and same second: the mtime in nanoseconds (and the inode of a replaced file) still tell
    tmp = tmp_path / "htpasswd.new"
    tmp.write_text(entry("alice", "new") + "\n" + entry("bob", "b") + "\n")
    os.replace(tmp, path)
    assert not await h.check("alice", "old")  # the remembered password is forgotten with the old entry
    assert await h.check("alice", "new") and await h.check("bob", "b")
    # written in place
    path.write_text(entry("bob", "b2") + "\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert not await h.check("alice", "new")
    assert await h.check("bob", "b2")
    # gone: the users read before stay (a half-done edit must not lock everyone out)
    path.unlink()
    assert await h.check("bob", "b2")
    path.write_text(entry("carol", "c") + "\n")
    assert await h.check("carol", "c") and not await h.check("bob", "b2")


async def test_htpasswd_basic_credentials(tmp_path: Path) -> None:
    import base64

    path = tmp_path / "htpasswd"
    path.write_text(entry("alice", "a:b") + "\n")
    h = Htpasswd(str(path))
    good = base64.b64encode(b"alice:a:b").decode()  # the password may hold a colon
    assert await h.check_basic(good) == "alice"
    assert await h.check_basic(good) == "alice"  # remembered
    assert await h.check_basic(base64.b64encode(b"alice:a").decode()) is None
    for bad in ("!!!", base64.b64encode(b"no colon").decode(), base64.b64encode(b"\xff:x").decode()):
        with pytest.raises(ValueError):
            await h.check_basic(bad)
    path.write_text(entry("alice", "other") + "\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert await h.check_basic(good) is None  # the remembered credentials went with the old entry


def test_htpasswd_missing_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(HtpasswdError, match=r"auth\.htpasswd\.path: cannot read"):
        Htpasswd(str(tmp_path / "absent"))


# --- tokens -------------------------------------------------------------------------------------

def verifier(bundle: Path, **extra: object) -> TokenVerifier:
    return TokenVerifier(TokenConfig(realm="https://auth.example/token", service=SERVICE, issuer=ISSUER,
                                     rootcertbundle=str(bundle), **extra))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_token_with_x5c_chain_to_the_bundle(tmp_path: Path, kind: str) -> None:
    pki = make_pki(kind)
    v = verifier(pki.bundle(tmp_path / "bundle.pem"))
    token = mint(pki.leaf, [repo("team/app", "pull", "push"), {"type": "registry", "name": "catalog",
                                                               "actions": ["*"]}], chain=[pki.intermediate])
    grants = v.verify(token)
    assert grants.subject == "alice"
    assert grants.allows("repository", "team/app", "push") and grants.allows("repository", "team/app", "pull")
    assert not grants.allows("repository", "team/app", "delete")
    assert not grants.allows("repository", "team/other", "pull")
    assert grants.allows("registry", "catalog", "*")
    # without the intermediate the leaf does not lead to the bundle
    with pytest.raises(InvalidToken, match="root bundle"):
        v.verify(mint(pki.leaf, []))
    # the root itself may sign (a self-signed token certificate listed in the bundle, the usual setup)
    assert v.verify(mint(pki.root, [repo("a", "pull")])).allows("repository", "a", "pull")


def test_token_signed_by_a_key_outside_the_bundle(tmp_path: Path) -> None:
    pki, other = make_pki(), make_pki()
    v = verifier(pki.bundle(tmp_path / "bundle.pem"))
    with pytest.raises(InvalidToken, match="root bundle"):
        v.verify(mint(other.leaf, [], chain=[other.intermediate]))
    with pytest.raises(InvalidToken, match="root bundle"):
        v.verify(mint(other.root, []))
    # a chain that claims our intermediate but whose leaf it never signed
    with pytest.raises(InvalidToken, match="root bundle"):
        v.verify(mint(other.leaf, [], chain=[pki.intermediate]))
    # the right certificate, the wrong key: the signature does not verify
    forged = type(pki.root)(other.root.key, pki.root.cert)
    with pytest.raises(InvalidToken, match="signature"):
        v.verify(mint(forged, []))


def test_token_kid_names_a_bundle_key(tmp_path: Path) -> None:
    pki = make_pki("ec")
    v = verifier(pki.bundle(tmp_path / "bundle.pem"))
    key = pki.root.cert.public_key()
    for kid in (rfc7638_thumbprint(key), libtrust_key_id(key)):  # type: ignore[arg-type]
        assert v.verify(mint(pki.root, [repo("a", "pull")], kid=kid)).allows("repository", "a", "pull")
    assert len(libtrust_key_id(key).split(":")) == 12  # type: ignore[arg-type]
    with pytest.raises(InvalidToken, match="untrusted key"):
        v.verify(mint(pki.root, [], kid="nope"))


def test_token_claims(tmp_path: Path) -> None:
    pki = make_pki()
    v = verifier(pki.bundle(tmp_path / "bundle.pem"))
    cases = {
        "expired": dict(expires_in=-120),
        "not valid yet": dict(nbf_offset=600),
        "another service": dict(aud="someone-else"),
        "untrusted issuer": dict(iss="evil"),
    }
    for message, extra in cases.items():
        with pytest.raises(InvalidToken, match=message):
            v.verify(mint(pki.root, [], **extra))  # type: ignore[arg-type]
    # within distribution's 60 s leeway
    v.verify(mint(pki.root, [], expires_in=-30))
    with pytest.raises(InvalidToken, match="malformed"):
        v.verify("not.a.token")
    # a symmetric token (anyone who knows the "key" could forge it) is refused before any key lookup
    hs256 = jwt.encode({"iss": ISSUER, "aud": SERVICE, "exp": time.time() + 60}, "k" * 32, algorithm="HS256")
    with pytest.raises(InvalidToken, match="algorithm"):
        v.verify(hs256)


def test_token_expiry_applies_to_remembered_tokens(tmp_path: Path) -> None:
    pki = make_pki()
    v = verifier(pki.bundle(tmp_path / "bundle.pem"))
    token = mint(pki.root, [repo("a", "pull")], expires_in=10)
    now = time.time()
    v.verify(token, now)
    v.verify(token, now + 60)  # leeway
    with pytest.raises(InvalidToken, match="expired"):
        v.verify(token, now + 100)


def test_token_algorithms_can_be_narrowed(tmp_path: Path) -> None:
    pki = make_pki("ec")
    v = verifier(pki.bundle(tmp_path / "bundle.pem"), signingalgorithms=("RS256",))
    with pytest.raises(InvalidToken, match="algorithm"):
        v.verify(mint(pki.root, []))


def test_bundle_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenSetupError, match="cannot read"):
        verifier(tmp_path / "absent.pem")
    (tmp_path / "empty.pem").write_text("nothing\n")
    with pytest.raises(TokenSetupError, match="no PEM certificates"):
        verifier(tmp_path / "empty.pem")


def test_expired_certificate_in_chain(tmp_path: Path) -> None:
    root = certificate("root", new_key("rsa"))
    old = certificate("old leaf", new_key("rsa"), issuer=root, ca=False, days=-1)
    (tmp_path / "b.pem").write_bytes(root.pem)
    with pytest.raises(InvalidToken, match="expired"):
        verifier(tmp_path / "b.pem").verify(mint(old, []))


# --- access rules -------------------------------------------------------------------------------

def rules(anonymous_pull: bool = False, *rule: AccessRule) -> AccessRules:
    return AccessRules(AccessConfig(anonymous_pull=anonymous_pull, rules=rule))


def test_access_defaults_are_registry2s() -> None:
    r = rules()
    for action in ("pull", "push", "delete"):
        assert r.allows("anyone", "team/app", action, proxied=False)
        assert not r.allows(None, "team/app", action, proxied=False)
    assert not r.allows(None, "library/alpine", "pull", proxied=True)  # anonymous_pull off
    r = rules(True)
    assert r.allows(None, "library/alpine", "pull", proxied=True)
    assert not r.allows(None, "library/alpine", "push", proxied=True)
    assert not r.allows(None, "team/app", "pull", proxied=False)  # private content stays closed


def test_access_first_matching_rule_decides_what_it_lists() -> None:
    r = rules(True,
              AccessRule(("team/secret/**",), pull=("alice",), push=("alice",), delete=()),
              AccessRule(("team/**",), push=("alice", "ci"), delete=("alice",)),
              AccessRule(("public/*",), pull=("*", "anonymous"), push=("*",)),
              AccessRule(("library/**",), pull=("*",)))
    assert r.allows("bob", "team/app", "pull", False)  # pull not listed: every authenticated user
    assert r.allows("ci", "team/app", "push", False) and not r.allows("bob", "team/app", "push", False)
    assert r.allows("alice", "team/app", "delete", False) and not r.allows("ci", "team/app", "delete", False)
    assert not r.allows("bob", "team/secret/x", "pull", False)  # the first rule wins over team/**
    assert not r.allows("alice", "team/secret/x", "delete", False)  # listed as nobody
    assert r.allows(None, "public/site", "pull", False)
    assert not r.allows(None, "public/site", "push", False) and r.allows("bob", "public/site", "push", False)
    assert not r.allows(None, "public/a/b", "pull", False)  # `*` stays within one component
    assert not r.allows(None, "library/alpine", "pull", True)  # a rule limits pull: anonymous_pull does not apply
    assert r.allows(None, "quay.io/org/app", "pull", True)
