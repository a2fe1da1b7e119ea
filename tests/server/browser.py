"""Headless Chromium driven by Selenium, for the playground tests.

Debian's `chromium` + `chromium-driver` packages (.ci/run installs them). The driver path is given,
so Selenium Manager never tries to download a browser; the flags keep Chromium off the network
(no component updates, sync or background fetches) and a fresh profile per test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1200,900")


@contextmanager
def chromium():
    """A Selenium WebDriver on headless Chromium with a fresh profile; skipped (not in CI) where the
    Debian packages are missing."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI"):
            raise RuntimeError("CI needs Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("no /usr/bin/chromium + /usr/bin/chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="omni-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
