"""HTTPS: the mirror with http.tls (certificates made here with `cryptography`), used by dockerd,
skopeo and curl, and with http.tls.clientcas (client certificates required).

About dockerd and certs.d: dockerd 20.10 reads `/etc/docker/certs.d/<host:port>/` only for
registries it considers secure, and it always treats 127.0.0.0/8 as insecure (for those it skips
certificate verification and loads no client certificate); it has no setting to move certs.d
either (only rootless mode does). With loopback as the only network here, a CA in certs.d would
change nothing, so these tests do not create one: dockerd is shown to push and pull over TLS (the
mirror has no plain-HTTP port to fall back to), and CA trust and client certificates are shown
with skopeo (`--cert-dir`, the same `ca.crt` / `client.cert` / `client.key` layout) and curl.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tests.auth_keys import Signer, certificate, new_key
from tests.e2e.conftest import require
from tests.e2e.push_helpers import push_config
from tests.support.clients import SKOPEO, Dockerd, skopeo
from tests.support.images import Layout
from tests.support.procs import Distribution, Mirror, http, run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
CURL = "/usr/bin/curl"


@dataclass
class Certs:
    dir: Path
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def cert_dir(self, client: bool) -> Path:
        """skopeo's --cert-dir (the certs.d layout): ca.crt, and client.cert/client.key."""
        d = self.dir / ("certs.d-client" if client else "certs.d")
        d.mkdir(exist_ok=True)
        (d / "ca.crt").write_bytes(self.ca.read_bytes())
        if client:
            (d / "client.cert").write_bytes(self.client_cert.read_bytes())
            (d / "client.key").write_bytes(self.client_key.read_bytes())
        return d

    def context(self, client: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if client:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


def _write(path: Path, signer: Signer) -> tuple[Path, Path]:
    cert, key = path.with_suffix(".crt"), path.with_suffix(".key")
    cert.write_bytes(signer.pem)
    key.write_bytes(signer.key_pem)
    return cert, key


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    d = tmp_path / "certs"
    d.mkdir()
    ca = certificate("e2e mirror CA", new_key("ec"))
    server = certificate("127.0.0.1", new_key("ec"), issuer=ca, ca=False, san=[
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    client = certificate("e2e client", new_key("ec"), issuer=ca, ca=False, client=True)
    ca_path, _ = _write(d / "ca", ca)
    cert, key = _write(d / "server", server)
    client_cert, client_key = _write(d / "client", client)
    return Certs(d, ca_path, cert, key, client_cert, client_key)


def tls_config(upstream_url: str, certs: Certs, client_cas: bool = False) -> dict[str, object]:
    config = push_config(upstream_url)
    tls: dict[str, object] = {"certificate": str(certs.cert), "key": str(certs.key)}
    if client_cas:
        tls["clientcas"] = [str(certs.ca)]
    config["http"] = {"tls": tls}
    return config


def curl_status(*args: str) -> str:
    r = run([CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--noproxy", "*", "--max-time", "20", *args],
            timeout=30, check=False)
    return r.stdout.strip() if r.returncode == 0 else f"exit {r.returncode}"


def test_docker_push_and_pull_over_https(docker: Dockerd, mirror_factory: Callable[..., Mirror],
                                         docker_mirror: Callable[..., Mirror], upstream: Distribution,
                                         layouts: dict[str, Layout], certs: Certs) -> None:
    docker_mirror(push_config(upstream.url))
    docker.pull("small")
    mirror = mirror_factory(tls_config(upstream.url, certs), context=certs.context())
    assert mirror.url.startswith("https://")
    assert curl_status(f"http://{mirror.host}/v2/") != "200"  # no plain HTTP on the TLS port
    ref = f"{mirror.host}/team/tls:v1"
    docker.cli("tag", "small", ref)
    out = docker.cli("push", ref).stdout
    assert "v1: digest: sha256:" in out, out
    docker.cli("rmi", ref)
    docker.pull(ref)
    assert docker.image_id(ref) == layouts["small"].image().config.digest
    pushed = [e for e in mirror.requests() if e["method"] == "PUT" and e["path"] == "/v2/team/tls/manifests/v1"]
    assert [e["status"] for e in pushed] == [201]


def test_plain_http_on_the_tls_port_gets_400_and_a_hint(docker: Dockerd, mirror_factory: Callable[..., Mirror],
                                                        upstream: Distribution, certs: Certs) -> None:
    """dockerd falls back to plain HTTP for a loopback registry whose TLS handshake it cannot finish
    (client certificates required here): it used to get an empty reply and say `EOF`; like registry:2's,
    the answer is a 400, and it says what to do."""
    mirror = mirror_factory(tls_config(upstream.url, certs, client_cas=True), context=certs.context(client=True))
    r = run([CURL, "-sS", "-i", "--noproxy", "*", "--max-time", "20", f"http://{mirror.host}/v2/"], timeout=30)
    assert r.stdout.startswith("HTTP/1.1 400 Bad Request"), r.stdout
    assert '"code": "TLS_REQUIRED"' in r.stdout and f"use https://{mirror.host}/" in r.stdout
    out = docker.cli("pull", f"{mirror.host}/team/app:v1", check=False)
    assert out.returncode != 0
    assert f"client sent an HTTP request to an HTTPS server: this port speaks HTTPS only; use https://{mirror.host}/" \
        in out.stderr, out.stderr
    assert "EOF" not in out.stderr
    assert curl_status("--cacert", str(certs.ca), "--cert", str(certs.client_cert), "--key", str(certs.client_key),
                       f"https://{mirror.host}/v2/") == "200"  # and TLS is served as before


def test_skopeo_and_curl_trust_the_ca(mirror_factory: Callable[..., Mirror], upstream: Distribution,
                                      layouts: dict[str, Layout], certs: Certs, tmp_path: Path) -> None:
    require(SKOPEO, CURL)
    small = layouts["small"]
    mirror = mirror_factory(tls_config(upstream.url, certs), context=certs.context())
    assert curl_status("--cacert", str(certs.ca), f"{mirror.url}/v2/") == "200"
    assert curl_status(f"{mirror.url}/v2/") == "exit 60"  # not trusted without the CA
    dest = f"docker://{mirror.host}/team/https:v1"
    cert_dir = certs.cert_dir(client=False)
    r = skopeo("copy", "--dest-no-creds", "--retry-times", "0", small.oci_ref(), dest, check=False, timeout=60)
    assert r.returncode != 0 and "certificate" in r.stderr.lower(), r.stderr  # verifies by default
    skopeo("copy", "--dest-no-creds", "--dest-cert-dir", str(cert_dir), "--retry-times", "0", small.oci_ref(), dest)
    skopeo("copy", "--src-no-creds", "--src-cert-dir", str(cert_dir), "--retry-times", "0",
           f"docker://{mirror.host}/library/small:latest", f"oci:{tmp_path / 'pulled'}:latest")
    r = http("GET", f"{mirror.url}/v2/team/https/manifests/v1", {"Accept": small.top.media_type},
             context=certs.context())
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == small.digest


def test_client_certificates_required_with_clientcas(mirror_factory: Callable[..., Mirror], upstream: Distribution,
                                                     layouts: dict[str, Layout], certs: Certs) -> None:
    require(SKOPEO, CURL)
    small = layouts["small"]
    mirror = mirror_factory(tls_config(upstream.url, certs, client_cas=True), context=certs.context(client=True))
    ca = ["--cacert", str(certs.ca)]
    assert curl_status(*ca, "--cert", str(certs.client_cert), "--key", str(certs.client_key),
                       f"{mirror.url}/v2/") == "200"
    assert curl_status(*ca, f"{mirror.url}/v2/").startswith("exit ")  # handshake refused without one
    other = certificate("stranger", new_key("ec"), ca=False, client=True)  # not issued by the client CA
    stranger_cert, stranger_key = _write(certs.dir / "stranger", other)
    assert curl_status(*ca, "--cert", str(stranger_cert), "--key", str(stranger_key),
                       f"{mirror.url}/v2/").startswith("exit ")
    dest = f"docker://{mirror.host}/team/mtls:v1"
    r = skopeo("copy", "--dest-no-creds", "--dest-cert-dir", str(certs.cert_dir(client=False)), "--retry-times", "0",
               small.oci_ref(), dest, check=False, timeout=60)
    assert r.returncode != 0, r.stdout
    skopeo("copy", "--dest-no-creds", "--dest-cert-dir", str(certs.cert_dir(client=True)), "--retry-times", "0",
           small.oci_ref(), dest)
    r = http("GET", f"{mirror.url}/v2/team/mtls/manifests/v1", {"Accept": small.top.media_type},
             context=certs.context(client=True))
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == small.digest
