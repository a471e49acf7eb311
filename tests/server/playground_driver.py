"""Headless Debian Chromium (selenium, no browser download) driving the playground page, and pixel reads."""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@contextmanager
def chromium(width: int = 1200, height: int = 1000, offline: bool = False) -> Iterator[webdriver.Chrome]:
    """Headless Chromium; `offline`: every host name but the loopback address fails to resolve (no CDN, no fonts)."""
    assert CHROMIUM and CHROMEDRIVER, "chromium and chromium-driver are installed by deploy/install-system.sh"
    profile = tempfile.mkdtemp(prefix="chiar-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--force-device-scale-factor=1", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    if offline:
        options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """SEVERE console entries since the last call (reading the log empties it)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_page(driver: webdriver.Chrome, url: str) -> None:
    driver.get(url + "/")
    WebDriverWait(driver, 60).until(lambda d: "context" in d.find_element(By.ID, "model").text)


def run_mode(driver: webdriver.Chrome, mode: str, text: str, timeout: float = 120, **fields: object) -> str:
    """Pick a mode, fill the form, press the run button; returns the final status ("done", "failed")."""
    driver.find_element(By.ID, f"tab-{mode}").click()
    for name, value in fields.items():
        element = driver.find_element(By.ID, name)
        if element.tag_name == "select":
            Select(element).select_by_value(str(value))
        else:
            element.clear()
            element.send_keys(str(value))
    driver.execute_script("document.getElementById('prompt').value = arguments[0]", text)
    driver.execute_script("document.getElementById('status').textContent = ''")
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.ID, "status").text in ("done", "failed", "stopped"))
    return driver.find_element(By.ID, "status").text


def colour_by(driver: webdriver.Chrome, value: str) -> None:
    Select(driver.find_element(By.ID, "colour_by")).select_by_value(value)


def pixels(driver: webdriver.Chrome, elements: list, dx: int | None = None, dy: int | None = None) -> list[tuple[int, int, int]]:
    """RGB of each element, read from a real screenshot: at (dx, dy) inside its box, or its centre.
    Each element is scrolled into view and shot on its own (the screenshot holds the viewport only)."""
    out = []
    for element in elements:
        driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", element)
        rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height];", element)
        image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        x = rect[0] + (dx if dx is not None else rect[2] / 2)
        y = rect[1] + (dy if dy is not None else rect[3] / 2)
        out.append(image.getpixel((int(x), int(y))))
    return out


def brightness(rgb: tuple[int, int, int]) -> float:
    return sum(rgb) / 3
