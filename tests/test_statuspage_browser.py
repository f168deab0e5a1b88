"""The status page in headless Chromium, driven through chromedriver's W3C WebDriver protocol (plain
HTTP with requests, no selenium): the page loads, shows the frame, and updates in place."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.service.statuspage import StatusServer
from tests.helpers.broker import free_port
from tests.test_statuspage import FakeAgent

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium is not installed: apt-get install chromium chromium-driver (scripts/test.sh does)",
)

# The flags keep Chromium off the network and quiet: no updates, no sync, no first-run pages.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--disable-breakpad",
    "--disable-crash-reporter",
    "--window-size=1280,900",
]


class WebDriver:
    """The few W3C WebDriver commands this test needs."""

    def __init__(self, base: str, user_data_dir: Path) -> None:
        self.base = base
        options = {"binary": CHROMIUM, "args": CHROMIUM_ARGS + [f"--user-data-dir={user_data_dir}"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        reply = requests.post(f"{base}/session", json=caps, timeout=60).json()["value"]
        assert "sessionId" in reply, f"chromedriver refused the session: {reply}"
        self.session = f"{base}/session/{reply['sessionId']}"

    def go(self, url: str) -> None:
        self._call("post", "/url", {"url": url})

    def js(self, script: str) -> Any:
        return self._call("post", "/execute/sync", {"script": script, "args": []})

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._call("get", "/screenshot")))

    def quit(self) -> None:
        requests.delete(self.session, timeout=30)

    def wait_for(self, script: str, until: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script)
            if until(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting on {script!r}; last value {value!r}")
            time.sleep(0.1)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.request(method, self.session + path, json=body, timeout=30)
        value = response.json()["value"]
        assert response.status_code == 200, f"{path}: {value}"
        return value


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    port = free_port()
    assert CHROMEDRIVER is not None
    proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if requests.get(f"{base}/status", timeout=1).json()["value"]["ready"]:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        driver = WebDriver(base, tmp_path / "chromium-profile")
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


GATE = "document.querySelector('[data-pipeline=\"gate\"]')"


def test_page_shows_the_frame_and_updates(browser: WebDriver, tmp_path: Path) -> None:
    agent = FakeAgent()
    with StatusServer("127.0.0.1:0", agent.snapshot, agent.frame, agent.alive) as server:
        browser.go(server.url)

        width = browser.wait_for(
            f"const c = {GATE}; return c && c.querySelector('img').naturalWidth", lambda w: bool(w)
        )
        assert width == 320
        assert browser.js(f"return {GATE}.querySelector('img').dataset.loaded") == "1"
        model = browser.js(f"return {GATE}.querySelector('.model').textContent")
        assert model == "text-detector 1.4.0 on CPUExecutionProvider"
        assert browser.js("return document.getElementById('device').textContent") == "gate-cam-01"

        first = float(browser.js(f"return {GATE}.querySelector('.fps').dataset.fps"))
        polls = int(browser.js("return document.body.dataset.polls"))
        # The fake's fps rises with every snapshot, and a model swap must show without a reload.
        agent.model_version = "1.5.0"
        second = float(browser.wait_for(f"return {GATE}.querySelector('.fps').dataset.fps", lambda v: float(v) > first))
        assert second > first >= 10.5
        browser.wait_for(f"return {GATE}.querySelector('.model').dataset.version", lambda v: v == "1.5.0")
        assert int(browser.js("return document.body.dataset.polls")) > polls
        assert int(browser.js(f"return {GATE}.querySelector('.fps-chart').dataset.points")) >= 2
        assert int(browser.js(f"return {GATE}.querySelector('.latency-chart').dataset.points")) >= 2

        # A pipeline without frames (audio) shows its numbers and a thin "no frame" strip.
        browser.wait_for(
            "return document.querySelector('[data-pipeline=\"door-mic\"] .frame').className", lambda v: "none" in v
        )
        assert browser.js("return document.querySelector('[data-pipeline=\"door-mic\"] .fps').textContent") == "31.3"

        shot = tmp_path / "statuspage.png"
        browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
