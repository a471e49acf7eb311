"""The playground page in real headless Chromium: generate, then read the routing heatmap's pixels."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.server.conftest import ServerProcess

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    assert CHROMIUM and CHROMEDRIVER, "chromium and chromium-driver are installed by deploy/install-system.sh"
    profile = tempfile.mkdtemp(prefix="chiar-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# Cell centre colour -> operator, as app.js paints them: the dominant channel survives the entropy shading.
READ_CELLS = """
const canvas = document.getElementById('heatmap');
const ctx = canvas.getContext('2d');
const [rows, layers, cell, rowH] = arguments;
const out = [];
for (let t = 0; t < rows; t++) {
  const row = [];
  for (let l = 0; l < layers; l++) {
    const p = ctx.getImageData(1 + l * cell + Math.floor(cell / 2), 1 + t * rowH + Math.floor(rowH / 2), 1, 1).data;
    const [r, g, b] = p;
    row.push(r === g && g === b ? 'identity' : (b > r && b > g ? 'dct' : (r > g && r > b ? 'attention' : 'rbf')));
  }
  out.push(row);
}
return out;
"""


def test_playground_generates_and_draws_the_routing_heatmap(server: ServerProcess, browser: webdriver.Chrome) -> None:
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "context" in d.find_element(By.ID, "model").text)  # /v1/models answered
    prompt = "The history of the city begins"
    for field, value in (("max_new_tokens", "6"), ("temperature", "0"), ("seed", "7")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "done")

    expected = httpx.post(server.url + "/v1/generate", timeout=60, json={
        "prompt": prompt, "max_new_tokens": 6, "temperature": 0, "seed": 7, "return_routing": True}).json()
    assert browser.execute_script("return document.getElementById('output').textContent") == expected["text"]
    assert "tokens, finish" in browser.find_element(By.ID, "stats").text

    routing = expected["routing"]
    rows, layers = len(routing["operator"]), len(routing["operator"][0])
    cell = max(4, min(24, 780 // (layers + 1)))
    row_h = max(3, min(14, 4000 // rows))
    width, height = browser.execute_script("const c = document.getElementById('heatmap'); return [c.width, c.height];")
    assert (width, height) == ((layers + 1) * cell + 2, rows * row_h + 2)
    drawn = browser.execute_script(READ_CELLS, rows, layers, cell, row_h)
    names = routing["operator_names"]
    want = [[names[op] for op in row] for row in routing["operator"]]
    assert drawn == want
    assert any("attention" in row[1:-1] for row in drawn) and any("dct" in row[1:-1] for row in drawn)
    browser.save_screenshot(str(server.log_path.with_name("playground.png")))
