"""/docs (Swagger UI) and /redoc in real headless Chromium with no network: every asset comes from the server,
and every operation of /openapi.json is listed."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.server.conftest import ServerProcess
from tests.server.playground_driver import chromium, console_errors


@pytest.fixture(scope="module")
def offline_browser() -> Iterator[webdriver.Chrome]:
    with chromium(offline=True) as driver:
        yield driver


def operations(url: str, headers: dict[str, str] | None = None) -> set[tuple[str, str]]:
    doc = httpx.get(url + "/openapi.json", headers=headers, timeout=10).json()
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def loaded_from(driver: webdriver.Chrome) -> list[str]:
    """Every resource the page loaded (scripts, styles, the document fetch)."""
    return [driver.current_url, *driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")]


def swagger_operations(driver: webdriver.Chrome, url: str) -> set[tuple[str, str]]:
    driver.get(url + "/docs")
    blocks = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))
    return {(b.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
             b.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path")) for b in blocks}


def test_swagger_ui_lists_every_operation_offline(server: ServerProcess, offline_browser: webdriver.Chrome) -> None:
    assert swagger_operations(offline_browser, server.url) == operations(server.url)
    resources = loaded_from(offline_browser)
    assert all(r.startswith(server.url + "/") for r in resources), resources
    assert {server.url + "/docs-assets/swagger-ui-bundle.js", server.url + "/docs-assets/swagger-ui.css"} <= set(resources)
    assert console_errors(offline_browser) == []


def test_redoc_lists_every_operation_offline(server: ServerProcess, offline_browser: webdriver.Chrome) -> None:
    doc = httpx.get(server.url + "/openapi.json", timeout=10).json()
    wanted = {op["operationId"] for ops in doc["paths"].values() for op in ops.values()}
    offline_browser.get(server.url + "/redoc")

    def shown(driver: webdriver.Chrome) -> set[str]:  # ids "tag/openai/operation/<operationId>" (content and menu)
        return {e.get_attribute("data-section-id").rsplit("operation/", 1)[1]
                for e in driver.find_elements(By.CSS_SELECTOR, "[data-section-id*='operation/']")}

    WebDriverWait(offline_browser, 90).until(lambda d: len(shown(d)) >= len(wanted))
    assert shown(offline_browser) == wanted
    resources = loaded_from(offline_browser)
    assert all(r.startswith(server.url + "/") for r in resources), resources
    assert server.url + "/docs-assets/redoc.standalone.js" in resources
    assert console_errors(offline_browser) == []


def test_docs_load_without_the_api_key(keyed_docs_server: ServerProcess, offline_browser: webdriver.Chrome) -> None:
    # the pages, their assets and the document are public; the operations still say they need the key
    assert httpx.get(keyed_docs_server.url + "/docs-assets/swagger-ui.css", timeout=10).status_code == 200
    assert httpx.get(keyed_docs_server.url + "/tokenizer_info", timeout=10).status_code == 401
    assert swagger_operations(offline_browser, keyed_docs_server.url) == operations(keyed_docs_server.url)
    assert offline_browser.find_elements(By.CSS_SELECTOR, ".btn.authorize")
    assert console_errors(offline_browser) == []


@pytest.fixture(scope="module")
def keyed_docs_server(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "keyed-docs.log", env={"CHIAR_API_KEY": "sekret"}).start()
    yield proc
    proc.stop()
