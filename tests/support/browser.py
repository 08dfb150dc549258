"""Headless Chromium driven by Selenium, all from Debian and PyPI.

``make test`` installs Debian's ``chromium`` and ``chromium-driver``
(tools/install-system-deps.sh) and Selenium (setup.cfg's test extra).
What these machines taught (../shared/recipes/selenium_smoke.py):

- give Selenium the driver's path: otherwise Selenium Manager tries to
  download a driver, which fails offline (SE_OFFLINE makes that explicit);
- as root Chromium needs ``--no-sandbox``; ``--disable-dev-shm-usage``
  avoids crashes with a small /dev/shm;
- start-up takes a second or two: one driver per test module.
"""

from __future__ import annotations

import os
import tempfile

from tests.support.programs import require_program


def chromium(width: int = 1360, height: int = 900):
    """A headless Chromium WebDriver; the caller quits it."""
    binary = require_program("chromium")
    driver_path = require_program("chromedriver")
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    profile = tempfile.mkdtemp(prefix="mailgate-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", f"--user-data-dir={profile}", "--no-first-run",
                "--disable-background-networking", "--disable-sync", "--disable-extensions"):
        opts.add_argument(arg)
    # the browser's console (CSP violations, script errors) for the tests to read
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(30)
    driver.profile_dir = profile
    return driver


def quit_driver(driver) -> None:
    import shutil

    try:
        driver.quit()
    finally:
        shutil.rmtree(getattr(driver, "profile_dir", ""), ignore_errors=True)
