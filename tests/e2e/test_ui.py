"""The web UI in a real browser: Debian's chromium (headless), driven by Selenium through Debian's
chromium-driver, against a real mirror process after a real `docker push` and pull-through.

Screenshots of every page visited go to test-artifacts/ui/ at the repository root (gitignored),
so a reviewer sees what the test saw, on a desktop and on a phone-sized window."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.e2e.conftest import require
from tests.e2e.push_helpers import push_config
from tests.support.clients import Dockerd
from tests.support.images import Layout, seed
from tests.support.procs import REPO_ROOT, Distribution, Mirror, htpasswd_config, http
from tests.support.registry import get_manifest
from tests.support.tokenserver import ISSUER, SERVICE, TokenServerProc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "ui"


class Browser:
    """One headless chromium; `shot(name)` saves what it shows now under test-artifacts/ui/."""

    def __init__(self, driver: webdriver.Chrome, prefix: str) -> None:
        self.driver = driver
        self.prefix = prefix

    def get(self, url: str) -> None:
        self.driver.get(url)

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.prefix}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def all(self, css: str) -> list[WebElement]:
        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def one(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def texts(self, css: str) -> list[str]:
        return [e.text.strip() for e in self.all(css)]

    def until(self, check: Callable[[], bool], what: str, timeout: float = 15.0, reload: bool = False) -> None:
        """Poll `check` (reloading the page between tries if asked) for at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self._holds(check):
            if time.monotonic() > deadline:
                self.shot("timeout")
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} on {self.driver.current_url}")
            time.sleep(0.3)
            if reload:
                self.driver.refresh()

    @staticmethod
    def _holds(check: Callable[[], bool]) -> bool:
        """`check()`, false while the page it reads is being replaced (a submitted form, a reload)."""
        try:
            return check()
        except StaleElementReferenceException:
            return False

    def fits_width(self) -> bool:
        """Nothing sticks out sideways (the page needs no horizontal scrolling)."""
        return bool(self.driver.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1"))


@pytest.fixture
def browser(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Browser]:
    require(CHROMIUM, CHROMEDRIVER)
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-proxy-server",
                "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chromium'}", "--no-first-run"):
        options.add_argument(arg)
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as e:
        raise AssertionError(f"chromium did not start: {e}") from None
    driver.set_page_load_timeout(30)
    try:
        yield Browser(driver, request.node.name.removeprefix("test_"))
    finally:
        driver.quit()


def manifest_of(mirror: Mirror, repo: str, ref: str) -> tuple[str, dict[str, Any]]:
    digest, body = get_manifest(mirror.url, repo, ref)
    return digest, json.loads(body)


def tags_of(mirror: Mirror, repo: str) -> list[str]:
    r = http("GET", f"{mirror.url}/v2/{repo}/tags/list")
    return list(r.json()["tags"]) if r.status == 200 else []


def test_push_pull_browse_and_delete(docker: Dockerd, docker_mirror: Callable[..., Mirror], upstream: Distribution,
                                     layouts: dict[str, Layout], browser: Browser) -> None:
    mirror = docker_mirror(push_config(upstream.url))
    docker.pull("small")  # registry-mirrors: through the mirror, from the upstream
    docker.pull("multi")  # an index: dockerd takes the linux/amd64 image
    ref = f"{mirror.host}/team/app:v1"
    docker.cli("tag", "small", ref)
    out = docker.cli("push", ref).stdout
    m = re.search(r"v1: digest: (sha256:[0-9a-f]{64})", out)
    assert m, out
    pushed = m.group(1)
    assert manifest_of(mirror, "team/app", "v1")[0] == pushed

    # the list: both kinds, each with what it is
    browser.get(f"{mirror.url}/ui/")
    browser.until(lambda: {"team/app", "library/small", "library/multi"} <= set(browser.texts("a.repo")),
                  "the pushed and the pulled repositories", reload=True)
    assert browser.texts("a.repo") == ["library/multi", "library/small", "team/app"]
    row = {r.find_element(By.CSS_SELECTOR, "a.repo").text: r.text for r in browser.all("#repositories tbody tr")}
    assert "private" in row["team/app"] and "cached" in row["library/small"] and "hub" in row["library/small"]
    browser.shot("list")
    # the filter
    search = browser.one("input[name=q]")
    search.send_keys("small")
    search.submit()
    browser.until(lambda: browser.texts("a.repo") == ["library/small"], "the filtered list")
    assert "1 of 3 repositories" in browser.one("#count").text
    browser.shot("list-filtered")

    # a tag page of the pull-through: the digest dockerd pulled, the pull commands
    browser.get(f"{mirror.url}/ui/repo/library/small")
    (tag_row,) = browser.all("#tags tbody tr")
    assert tag_row.find_element(By.CSS_SELECTOR, ".tag").text == "latest"
    assert tag_row.find_element(By.CSS_SELECTOR, "a.digest").text == layouts["small"].digest
    commands = browser.texts("#tags code.cmd")
    assert commands == [f"docker pull {mirror.host}/library/small:latest", "docker pull small:latest"]
    assert "never" not in tag_row.find_element(By.CSS_SELECTOR, "td[data-label='Last pulled']").text
    browser.shot("tag-page-cached")
    # the index: its platforms
    browser.get(f"{mirror.url}/ui/repo/library/multi")
    (multi_row,) = browser.all("#tags tbody tr")
    assert multi_row.find_element(By.CSS_SELECTOR, "td[data-label='Platforms']").text == "linux/amd64, linux/arm64"
    assert multi_row.find_element(By.CSS_SELECTOR, "a.digest").text == layouts["multi"].digest

    # the pushed repository's tag page, then its manifest page
    browser.get(f"{mirror.url}/ui/")
    browser.one("a.repo[href='/ui/repo/team/app']").click()
    browser.until(lambda: bool(browser.all("#tags tbody tr")), "the tag page")
    (tag_row,) = browser.all("#tags tbody tr")
    assert tag_row.find_element(By.CSS_SELECTOR, "a.digest").text == pushed
    assert browser.texts("#tags code.cmd") == [f"docker pull {mirror.host}/team/app:v1"]
    assert "Created" in browser.one("#tags thead").text and "UTC" in tag_row.text
    browser.shot("tag-page-private")
    tag_row.find_element(By.CSS_SELECTOR, "a.digest").click()
    browser.until(lambda: bool(browser.all("#digest")), "the manifest page")
    _, manifest = manifest_of(mirror, "team/app", pushed)
    assert browser.one("#digest").text == pushed
    assert browser.texts("#layers code.layer-digest") == [layer["digest"] for layer in manifest["layers"]]
    assert browser.one("#config-digest").text == manifest["config"]["digest"]
    assert browser.texts("ol.history code")  # the config's history is shown
    browser.shot("manifest")

    # delete the tag: the confirm page, the box, the button
    browser.get(f"{mirror.url}/ui/repo/team/app")
    browser.one("#tags a.delete").click()
    browser.until(lambda: bool(browser.all("#confirm-form")), "the confirm page")
    browser.shot("confirm")
    browser.one("#do-delete").click()  # the box is not ticked: the browser keeps the form
    assert browser.all("#confirm-form") and "v1" in tags_of(mirror, "team/app")
    browser.one("#confirm").click()
    browser.one("#do-delete").click()
    browser.until(lambda: bool(browser.all("#deleted")), "the repository page after the delete")
    assert browser.one("#deleted").text == "Deleted team/app:v1."
    assert browser.all("#tags tbody tr a.digest") == []
    browser.shot("deleted")
    assert "v1" not in tags_of(mirror, "team/app")

    # a phone: the list fits the screen
    browser.driver.set_window_size(390, 844)
    browser.get(f"{mirror.url}/ui/")
    assert browser.fits_width()
    browser.shot("phone-list")
    browser.get(f"{mirror.url}/ui/repo/library/small")
    assert browser.fits_width()
    browser.shot("phone-tag-page")
    browser.get(f"{mirror.url}/ui/overview")
    assert browser.one("#cache-blob .big").text.endswith("%")
    browser.shot("phone-overview")


def test_a_docker_pull_through_is_listed_within_a_second(docker: Dockerd, docker_mirror: Callable[..., Mirror],
                                                         upstream: Distribution, layouts: dict[str, Layout]) -> None:
    """dockerd pulls through `registry-mirrors`: the repository is on the list, at its full size, within a
    second of `docker pull` returning (not at the next rebuild of the list, 45 s later)."""
    mirror = docker_mirror(push_config(upstream.url))

    def row() -> dict[str, Any] | None:
        data = http("GET", f"{mirror.url}/ui/api/repositories").json()
        return next((r for r in data["repositories"] if r["name"] == "library/multi"), None) if data["ready"] else None

    deadline = time.monotonic() + 10
    while http("GET", f"{mirror.url}/ui/api/repositories").json()["ready"] is not True:
        assert time.monotonic() < deadline, "the list was never built"
        time.sleep(0.05)
    multi = layouts["multi"]
    amd64 = multi.image("amd64")
    size = multi.top.size + amd64.manifest.size + sum(b.size for b in amd64.blobs)
    docker.pull("multi")  # an index: dockerd takes the linux/amd64 image
    pulled = time.monotonic()
    while (found := row()) is None or found["size"] != size:
        assert time.monotonic() - pulled < 1.0, f"not listed in full a second after the pull: {found}"
        time.sleep(0.05)
    assert found["kind"] == "cached" and found["tags"] == 1 and found["manifests"] == 2


def test_with_htpasswd_anonymous_users_see_no_delete_button(mirror_factory: Callable[..., Mirror],
                                                             upstream: Distribution, layouts: dict[str, Layout],
                                                             browser: Browser, tmp_path: Path) -> None:
    config = push_config(upstream.url)
    config.update(htpasswd_config(tmp_path, {"alice": "alice-secret"}))
    config["access"] = {"anonymous_pull": True}
    mirror = mirror_factory(config)
    seed(layouts["small"], mirror.host, "team/app", tag="v1", creds="alice:alice-secret")
    assert manifest_of(mirror, "library/small", "latest")[0] == layouts["small"].digest  # anonymous pull-through

    browser.get(f"{mirror.url}/ui/")
    browser.until(lambda: browser.texts("a.repo") == ["library/small"], "the cached repository", reload=True)
    assert browser.one("#login").text == "Log in"  # the private repository is not listed for anonymous users
    browser.get(f"{mirror.url}/ui/repo/library/small")
    assert browser.all("#tags tbody tr") and browser.all(".delete") == []
    browser.shot("anonymous")
    # the private repository: the Basic challenge (the browser's own login prompt), no page
    r = http("GET", f"{mirror.url}/ui/repo/team/app")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="e2e-basic-realm"'
    browser.get(f"{mirror.url}/ui/repo/team/app")
    assert browser.all(".delete") == []

    # alice: the header a browser sends once its Basic prompt was answered (Chrome ignores user:pw@
    # in a typed URL, and a headless one shows no prompt)
    token = base64.b64encode(b"alice:alice-secret").decode()
    browser.driver.execute_cdp_cmd("Network.enable", {})
    browser.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
    browser.get(f"{mirror.url}/ui/repo/team/app")
    browser.until(lambda: bool(browser.all("#tags tbody tr")), "alice's view of team/app")
    assert "alice" in browser.one(".who").text
    assert [e.text for e in browser.all("#tags a.delete")] == ["delete"]
    browser.shot("alice")


def test_with_token_auth_a_browser_logs_in_through_the_token_realm(mirror_factory: Callable[..., Mirror],
                                                                   upstream: Distribution, layouts: dict[str, Layout],
                                                                   browser: Browser, tmp_path: Path) -> None:
    """Token auth: the "Log in" link asks for a username and password as with htpasswd (the browser's
    own prompt); the mirror asks the token realm for a token with them, as `docker login` does, and
    shows what the token grants: alice (the realm's admin) the whole list and delete buttons, bob
    what he may pull, without them."""
    ts = TokenServerProc(tmp_path / "tokenserver", {"alice": "alice-secret", "bob": "bob-secret"}, anonymous_pull=True,
                         admins=("alice",)).start()
    try:
        config = push_config(upstream.url)
        config["auth"] = {"token": {"realm": ts.realm, "service": SERVICE, "issuer": ISSUER,
                                    "rootcertbundle": str(ts.cert_path)}}
        config["access"] = {"anonymous_pull": True}
        mirror = mirror_factory(config)
        seed(layouts["small"], mirror.host, "team/app", tag="v1", creds="alice:alice-secret")  # skopeo's token dance
        assert manifest_of(mirror, "library/small", "latest")[0] == layouts["small"].digest  # anonymous pull-through

        browser.get(f"{mirror.url}/ui/")
        browser.until(lambda: browser.texts("a.repo") == ["library/small"], "the cached repository", reload=True)
        assert browser.one("#login").text == "Log in"
        r = http("GET", f"{mirror.url}/ui/login")
        assert r.status == 401 and r.headers["WWW-Authenticate"] == f'Basic realm="{SERVICE}"'
        r = http("GET", f"{mirror.url}/ui/", {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()})
        assert r.status == 401  # the realm refused it

        def log_in(user: str, password: str) -> None:  # what the browser sends once its prompt was answered
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            browser.driver.execute_cdp_cmd("Network.enable", {})
            browser.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                                           {"headers": {"Authorization": f"Basic {token}"}})

        log_in("alice", "alice-secret")
        browser.get(f"{mirror.url}/ui/")
        browser.until(lambda: browser.texts("a.repo") == ["library/small", "team/app"], "alice's list", reload=True)
        assert "alice" in browser.one(".who").text
        browser.get(f"{mirror.url}/ui/repo/team/app")
        browser.until(lambda: bool(browser.all("#tags tbody tr")), "alice's view of team/app")
        assert [e.text for e in browser.all("#tags a.delete")] == ["delete"]
        browser.shot("token-alice")

        log_in("bob", "bob-secret")
        browser.get(f"{mirror.url}/ui/")
        assert browser.texts("a.repo") == ["library/small"] and "bob" in browser.one(".who").text  # no catalog
        browser.get(f"{mirror.url}/ui/repo/team/app")
        browser.until(lambda: bool(browser.all("#tags tbody tr")), "bob's view of team/app")
        assert browser.all(".delete") == []  # pull only
        browser.shot("token-bob")

        asked = [(t["account"], t["scopes"], t["status"]) for t in ts.requests() if t["account"] in ("alice", "bob")]
        assert ("alice", ["registry:catalog:*"], 200) in asked and ("alice", ["registry:catalog:*"], 401) in asked
        assert ("bob", ["repository:team/app:pull,delete"], 200) in asked
    finally:
        ts.stop()
