"""Headless Chromium from the distribution's packages, driven by Selenium through the packaged chromedriver.

No browser download: the binary and its driver are Debian's (`apt-get install chromium chromium-driver`, which
`make system-deps` runs). `browser()` yields a driver that sends the given headers (basic auth) with every
request; `wait_text` waits for text on the rendered page and, when it never comes, fails with a screenshot.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"
WAIT_S = 90.0  # the first render of a React UI on a busy 2-core machine


def chromium_paths() -> tuple[str, str] | None:
    browser = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = shutil.which(DRIVER)
    return (browser, driver) if browser and driver else None


def require_chromium() -> tuple[str, str]:
    found = chromium_paths()
    if found is None:
        pytest.skip("headless Chromium and chromedriver are not installed (`make system-deps` installs them)")
    return found


@contextlib.contextmanager
def browser(shots: Path, headers: dict[str, str] | None = None, size: tuple[int, int] = (1600, 1000)) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = require_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={size[0]},{size[1]}", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    shots.mkdir(parents=True, exist_ok=True)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        if headers:
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})
        driver.shots = shots
        yield driver
    finally:
        driver.quit()


def page_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''") or ""


def wait_text(driver, *texts: str, shot: str, timeout: float = WAIT_S) -> str:
    """Wait until every text is on the rendered page; save the screenshot `shot` either way."""
    deadline = time.monotonic() + timeout
    while True:
        body = page_text(driver)
        missing = [t for t in texts if t not in body]
        if not missing:
            time.sleep(1.0)  # let charts and late requests paint before the picture
            driver.save_screenshot(str(driver.shots / f"{shot}.png"))
            return page_text(driver)
        if time.monotonic() > deadline:
            driver.save_screenshot(str(driver.shots / f"{shot}.png"))
            raise AssertionError(f"{missing} not on {driver.current_url} after {timeout:.0f} s "
                                 f"(screenshot {driver.shots / shot}.png); the page says:\n{body[:3000]}")
        time.sleep(0.5)


def close_mlflow_assistant(driver) -> None:
    """MLflow's chat side panel opens on every page: close it, the runs need the width."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()
            time.sleep(0.5)
            return


def click(driver, css: str, what: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, 60).until(ec.element_to_be_clickable((By.CSS_SELECTOR, css))).click()
    except Exception as e:
        driver.save_screenshot(str(driver.shots / f"failed-{what}.png"))
        raise AssertionError(f"no clickable {what} ({css}) on {driver.current_url}") from e


def click_text(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    xpath = f"//*[normalize-space(text())='{text}']"
    WebDriverWait(driver, 60).until(lambda d: any(e.is_displayed() for e in d.find_elements(By.XPATH, xpath)))
    next(e for e in driver.find_elements(By.XPATH, xpath) if e.is_displayed()).click()
