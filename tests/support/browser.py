"""Debian's headless Chromium driven by Selenium, for the console's browser tests.

    with chromium_browser() as browser:
        browser.get(url)

The test fails, naming the Debian package, when `chromium` or `chromium-driver` is missing.
The performance log is on: `requested_urls(browser)` lists every URL the browser has asked
for since the last call (pages, scripts, stylesheets, fonts, XHR), to prove that none is
third-party.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

__all__ = ["WINDOW", "chromium_browser", "requested_urls"]

# The reference screen: lists must fit it without sideways scrolling.
WINDOW = (1400, 1000)


def _require(binary: str, package: str) -> str:
    path = shutil.which(binary, path="/usr/bin:/usr/lib/chromium:/bin")
    if path is None:
        pytest.fail(f"{binary} is not installed: apt-get install {package}", pytrace=False)
    return path


@contextlib.contextmanager
def chromium_browser() -> Iterator:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -r requirements-dev.txt", pytrace=False)
    chromium = _require("chromium", "chromium")
    driver_path = _require("chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        # No background traffic of the browser's own (updates, safe browsing): the resource
        # log then holds only what the pages asked for.
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    # Chromium's scratch directories go to a directory of its own, removed afterwards, not
    # /tmp (tests that watch /tmp for leaked files must not see them).
    scratch = tempfile.mkdtemp(prefix="nbdweb-chromium-")
    service = Service(driver_path, env={**os.environ, "TMPDIR": scratch})
    browser = webdriver.Chrome(service=service, options=options)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(scratch, ignore_errors=True)


def requested_urls(browser) -> list[str]:
    """The URLs of the network requests logged since the last call."""
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls
