# SPDX-License-Identifier: GPL-2.0-or-later
"""The web console in a real browser (Debian's headless Chromium driven by Selenium): a user logs in,
sees a late host turn red, presses "Verify boot" and sees the screenshot appear, fails a point over and
opens the recovery VM's screen (noVNC through the console's relay).

With CONSOLE_SHOTS=DIR each page is saved there as a PNG (the README's screenshots)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.lab import guest
from tests.conftest import points_json, run_cli
from tests.integration.console import PASSWORDS, RunningConsole, add_users, console

pytestmark = pytest.mark.slow

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[object]:
    if not (Path(CHROMIUM).exists() and shutil.which(DRIVER)):
        pytest.fail("chromium and chromium-driver are required for this test: run ./install --dev")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--ignore-certificate-errors"):  # fmt: skip
        options.add_argument(arg)
    options.accept_insecure_certs = True  # the console's own self-signed certificate
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _until(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except Exception:  # an element replaced by the page's refresh between two lookups
            found = None
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def _shot(driver, name: str) -> None:  # type: ignore[no-untyped-def]
    folder = os.environ.get("CONSOLE_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def test_the_console_in_a_browser(browser, make_host, guest_image: Path, home: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    host = make_host(image=guest_image)
    guest.set_marker(host.disk, "console-test")
    assert run_cli(home, "backup", host.name).rc == 0
    assert run_cli(home, "host", "set", host.name, "--boot-check", "console:APPLIANCE-GUEST-UP", "--vm-memory", "256",
                   "--interval", "16s").rc == 0  # late 20 s after its point  # fmt: skip
    point = str(points_json(home, host.name)[-1]["id"])
    add_users(home)
    with console(home) as web:
        _log_in(browser, web, "oscar")
        row = f"host-{host.name}"
        assert browser.find_element(By.ID, row).get_attribute("data-state") == "protected"
        _until(lambda: browser.find_element(By.ID, row).get_attribute("data-state") == "late", 60,
               "the host did not turn late")  # fmt: skip
        badge = browser.find_element(By.CSS_SELECTOR, f"#{row} .badge")
        assert badge.text == "late" and badge.value_of_css_property("background-color") == "rgba(198, 40, 40, 1)"
        _shot(browser, "overview")

        browser.get(f"{web.url}/hosts/{host.name}")
        browser.find_element(By.CSS_SELECTOR, f"#point-{point} button.verify-boot").click()
        _until(lambda: "boot verification of" in browser.find_element(By.ID, "flash").text, 10, "no answer")
        shot = _until(lambda: browser.find_element(By.ID, f"shot-{point}"), 300, "no boot screenshot appeared")
        _until(lambda: browser.execute_script("return arguments[0].naturalWidth", shot) > 0, 10, "an empty image")
        assert "booted" in browser.find_element(By.ID, f"point-{point}").text
        _shot(browser, "host")

        browser.find_element(By.CSS_SELECTOR, f"#point-{point} button.failover").click()
        alert = browser.switch_to.alert
        assert f"Fail over {host.name} to point {point}" in alert.text
        alert.accept()
        browser.get(f"{web.url}/vms")
        _until(lambda: browser.find_elements(By.CSS_SELECTOR, f"#vm-{host.name} a.console-link"), 300,
               "the recovery VM did not come up")  # fmt: skip
        _until(lambda: browser.find_element(By.CSS_SELECTOR, f"#vm-{host.name} td.rto").text.endswith(" s"), 300,
               "the failover did not record its RTO")  # fmt: skip
        _shot(browser, "vms")
        browser.find_element(By.CSS_SELECTOR, f"#vm-{host.name} a.console-link").click()
        status = _until(lambda: browser.find_element(By.CSS_SELECTOR, "#vnc-status[data-state=connected]"), 30,
                        "the VM's console did not connect")  # fmt: skip
        assert status and browser.find_element(By.CSS_SELECTOR, "#screen canvas").size["width"] > 100
        time.sleep(2)  # a frame or two drawn
        _shot(browser, "console")
        browser.get(f"{web.url}/jobs")
        assert "verify-boot" in browser.page_source and "oscar" in browser.page_source
        _shot(browser, "jobs")
    assert run_cli(home, "failover", "stop", host.name).rc == 0


def _log_in(driver, web: RunningConsole, user: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.get(f"{web.url}/")
    assert "/login" in driver.current_url
    driver.find_element(By.ID, "user").send_keys(user)
    driver.find_element(By.ID, "password").send_keys("not the password")
    driver.find_element(By.ID, "login").click()
    error = _until(lambda: driver.find_element(By.ID, "login-error"), 10, "no answer to a wrong password")
    assert error.text == "wrong user name or password"  # type: ignore[attr-defined]
    driver.find_element(By.ID, "user").clear()
    driver.find_element(By.ID, "user").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(PASSWORDS[user])
    driver.find_element(By.ID, "login").click()
    who = _until(lambda: driver.find_element(By.ID, "who"), 10, "no page after logging in")
    assert who.text == f"{user} (operator)"  # type: ignore[attr-defined]
