"""The playground in real headless Chromium against a real server: the chiaroscuro token view, the grid,
perplexity mode, errors in plain words, and no console errors."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.server.conftest import ServerProcess
from tests.server.playground_driver import brightness, chromium, colour_by, console_errors, open_page, pixels, run_mode

PROMPT = "The history of the city begins"
GEN = {"max_new_tokens": 8, "temperature": 0.9, "top_p": 1, "seed": 7}


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def generated(server: ServerProcess, browser: webdriver.Chrome) -> dict:
    """One seeded generation in the page, and the same request made with httpx."""
    open_page(browser, server.url)
    assert run_mode(browser, "generate", PROMPT, **GEN) == "done", browser.find_element(By.ID, "error").text
    return httpx.post(server.url + "/v1/generate", timeout=60, json={
        "prompt": PROMPT, **GEN, "return_routing": True, "return_logprobs": True}).json()


def tokens(browser: webdriver.Chrome, mode: str = "generate") -> list:
    return browser.find_elements(By.CSS_SELECTOR, f"#result-{mode} .tokens .tok")


def part(browser: webdriver.Chrome, name: str, mode: str = "generate") -> WebElement:
    """One part (details, stats, grid, grid-caption) of a mode's own result section."""
    return browser.find_element(By.CSS_SELECTOR, f"#result-{mode} .{name}")


def test_tokens_carry_the_apis_text_and_routing(generated: dict, browser: webdriver.Chrome) -> None:
    spans = tokens(browser)
    routing = generated["routing"]
    n_prompt = routing["prompt_tokens"] - 1  # BOS is not shown
    # one element per token: the prompt's tokens (BOS left out), then every generated token
    assert len(spans) == n_prompt + len(generated["token_ids"])
    texts = [s.get_attribute("textContent") for s in spans]
    assert "".join(texts[:n_prompt]) == PROMPT
    assert "".join(texts[n_prompt:]) == generated["text"]
    names, layers = routing["operator_names"], len(routing["operator"][0])
    for i, span in enumerate(spans):
        position = i + 1  # in routing.tokens (BOS = 0)
        ops = [span.get_attribute(f"data-op-layer-{layer + 1}") for layer in range(layers)]
        if position < len(routing["operator"]):
            assert ops == [names[op] for op in routing["operator"][position]]
        else:  # the last generated token is never fed to the model
            assert ops == [None] * layers
        assert float(span.get_attribute("data-logprob")) == generated["logprobs"][position]
    assert "generated" not in spans[n_prompt - 1].get_attribute("class") and "boundary" in spans[n_prompt].get_attribute("class")
    assert console_errors(browser) == []


def test_token_details_on_hover_tap_and_keyboard(generated: dict, browser: webdriver.Chrome) -> None:
    spans = tokens(browser)
    spans[2].click()
    details = part(browser, "details").text
    assert f"Token 3 {spans[2].get_attribute('textContent')!r}".replace("'", '"') in details or "Token 3" in details
    tau = generated["routing"]["thresholds"][1][0]
    assert f"{tau:.3f}" in details and "surprisal" in details and "gate" in details
    spans[2].send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element.get_attribute("data-index") == "3"
    assert "Token 4" in part(browser, "details").text
    assert console_errors(browser) == []


def test_pixels_follow_the_operators(generated: dict, browser: webdriver.Chrome) -> None:
    routing = generated["routing"]
    names = routing["operator_names"]
    layer = 1  # layer 2, the first routing layer
    colour_by(browser, str(layer))
    spans = tokens(browser)
    picked = {}
    for i in range(len(routing["operator"]) - 1):
        picked.setdefault(names[routing["operator"][i + 1][layer]], i)
    assert {"attention", "dct"} <= picked.keys(), picked
    light, dark = pixels(browser, [spans[picked["attention"]], spans[picked["dct"]]], dx=3, dy=1)
    assert brightness(light) > 150 and brightness(dark) < 90, (light, dark)
    # the grid: same cells, layer rows, the boundary marked
    cells = {(c.get_attribute("data-token"), c.get_attribute("data-layer")): c
             for c in browser.find_elements(By.CSS_SELECTOR, "#result-generate .grid .cell")}
    assert len(cells) == len(spans) * (len(routing["thresholds"]) + 1)
    light, dark = pixels(browser, [cells[(str(picked["attention"]), "2")], cells[(str(picked["dct"]), "2")]])
    assert brightness(light) > 150 and brightness(dark) < 90, (light, dark)
    assert cells[(str(picked["attention"]), "2")].get_attribute("data-op") == "attention"
    heads = browser.find_elements(By.CSS_SELECTOR, "#result-generate .grid .colhead")
    assert [h.get_attribute("textContent") for h in heads][:3] == [s.get_attribute("textContent") for s in spans[:3]]
    assert sum("boundary" in h.get_attribute("class") for h in heads) == 1
    caption = part(browser, "grid-caption").text
    assert f"{(1 - generated['flops']['ratio']) * 100:.1f}% saved" in caption
    colour_by(browser, "all")
    assert console_errors(browser) == []


def test_perplexity_mode_shows_the_apis_numbers(server: ServerProcess, browser: webdriver.Chrome) -> None:
    text = "Robert Boulter is an English film , television and theatre actor . He had a guest role in 2000 ."
    open_page(browser, server.url)
    assert run_mode(browser, "perplexity", text) == "done", browser.find_element(By.ID, "error").text
    api = httpx.post(server.url + "/v1/perplexity", timeout=60, json={"text": text, "return_logprobs": True}).json()["results"][0]
    for element, key in (("ppl-token", "perplexity"), ("ppl-word", "word_perplexity"), ("ppl-bpb", "bits_per_byte")):
        shown = browser.find_element(By.CSS_SELECTOR, f"#result-perplexity .stats [data-stat={element}]")
        assert float(shown.get_attribute("data-value")) == api[key]
        assert f"{api[key]:.3f}" in shown.text
    flops = browser.find_element(By.CSS_SELECTOR, "#result-perplexity .stats [data-stat=ppl-flops]")
    assert float(flops.get_attribute("data-value")) == api["flops"]["ratio"] < 1  # the tiny CHIAR routes some tokens to DCT
    assert f"{(1 - api['flops']['ratio']) * 100:.1f}% saved" in part(browser, "grid-caption", "perplexity").text
    spans = tokens(browser, "perplexity")
    assert "".join(s.get_attribute("textContent") for s in spans) == text
    assert [float(s.get_attribute("data-logprob")) for s in spans] == [e["logprob"] for e in api["logprobs"]]
    colour_by(browser, "surprisal")  # the most and the least surprising tokens: deep and pale
    spans = tokens(browser, "perplexity")  # drawn anew
    order = sorted(range(len(spans)), key=lambda i: api["logprobs"][i]["logprob"])
    deep, pale = pixels(browser, [spans[order[0]], spans[order[-1]]], dx=3, dy=1)
    assert brightness(deep) < brightness(pale), (deep, pale)
    # characters split across byte-level tokens still come out whole
    unicode = "Café « naïve » — 東京 ☃"
    assert run_mode(browser, "perplexity", unicode) == "done", browser.find_element(By.ID, "error").text
    pieces = [s.get_attribute("textContent") for s in tokens(browser, "perplexity")]
    assert "".join(pieces) == unicode and len(pieces) == len(httpx.post(
        server.url + "/v1/perplexity", timeout=60, json={"text": unicode, "return_logprobs": True}).json()["results"][0]["logprobs"])
    assert console_errors(browser) == []


def test_overlong_prompt_is_explained_in_plain_words(server: ServerProcess, browser: webdriver.Chrome) -> None:
    open_page(browser, server.url)
    console_errors(browser)
    assert run_mode(browser, "generate", "word " * 400, **GEN) == "failed"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.text.startswith("Too long for this model:") and "Shorten the prompt" in error.text
    # the only console entry is Chromium's own note of the 400 answer
    assert all("status of 400" in m for m in console_errors(browser))


def test_compare_needs_two_models(server: ServerProcess, browser: webdriver.Chrome) -> None:
    open_page(browser, server.url)
    browser.find_element(By.ID, "tab-compare").click()
    note = browser.find_element(By.ID, "compare-note")
    assert note.is_displayed() and "two --checkpoint" in note.text and "serves one" in note.text
    assert not browser.find_element(By.ID, "run").is_enabled()  # nothing to run, so no failure either
    assert not any(p.is_displayed() for p in browser.find_elements(By.CSS_SELECTOR, ".pane"))  # no empty boxes
    assert not browser.find_element(By.ID, "error").is_displayed() and browser.find_element(By.ID, "status").text == ""
    browser.find_element(By.ID, "tab-generate").click()
    assert browser.find_element(By.ID, "run").is_enabled()
    assert console_errors(browser) == []


def test_works_with_an_api_key(tiny_checkpoint, tmp_path) -> None:
    server = ServerProcess(tiny_checkpoint, tmp_path / "server.log", env={"CHIAR_API_KEY": "sesame"}).start()
    try:
        assert httpx.get(server.url + "/favicon.ico").status_code == 200  # public, like the page
        with chromium() as driver:
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: "API key" in d.find_element(By.ID, "model").text)  # said in plain words
            assert run_mode(driver, "generate", PROMPT, **GEN) == "failed"
            assert "needs an API key" in driver.find_element(By.ID, "error").text
            assert all("status of 401" in m for m in console_errors(driver))
            key = driver.find_element(By.ID, "api_key")
            key.send_keys("sesame")
            key.send_keys(Keys.TAB)  # change event: the models load again, with the key
            wait.until(lambda d: "context" in d.find_element(By.ID, "model").text)
            assert run_mode(driver, "generate", PROMPT, **GEN) == "done"
            assert len(tokens(driver)) > 8
            assert console_errors(driver) == []
    finally:
        server.stop()


def test_modes_keep_their_own_colours_legend_status_and_results(server: ServerProcess, browser: webdriver.Chrome) -> None:
    open_page(browser, server.url)
    select = lambda: browser.find_element(By.ID, "colour_by").get_attribute("value")  # noqa: E731
    legend = lambda: browser.find_element(By.ID, "legend").text  # noqa: E731
    status = lambda: browser.find_element(By.ID, "status").text  # noqa: E731
    text = lambda mode: "".join(s.get_attribute("textContent") for s in tokens(browser, mode))  # noqa: E731
    assert run_mode(browser, "generate", PROMPT, **GEN) == "done"
    generated = text("generate")
    colour_by(browser, "1")  # layer 2, in Generate only
    assert "Layer 2" in legend()
    # Perplexity before anything is scored: its own empty result, colours, legend and status
    browser.find_element(By.ID, "tab-perplexity").click()
    assert not part(browser, "tokens").is_displayed() and tokens(browser, "perplexity") == []
    assert part(browser, "stats", "perplexity").text == "" and status() == "" and select() == "all"
    assert "share of routing layers" in legend()
    scored = "Robert Boulter is an English film , television and theatre actor ."
    assert run_mode(browser, "perplexity", scored) == "done"
    colour_by(browser, "surprisal")
    # back and forth: each mode shows what it had
    for _ in range(2):
        browser.find_element(By.ID, "tab-generate").click()
        assert text("generate") == generated and status() == "done" and select() == "1" and "Layer 2" in legend()
        assert part(browser, "stats").find_elements(By.CSS_SELECTOR, "[data-stat=stat-tokens]")
        assert not part(browser, "tokens", "perplexity").is_displayed()
        browser.find_element(By.ID, "tab-perplexity").click()
        assert text("perplexity") == scored and status() == "done" and select() == "surprisal" and "Surprisal" in legend()
        assert part(browser, "stats", "perplexity").find_elements(By.CSS_SELECTOR, "[data-stat=ppl-token]")
    # a failed generation replaces Generate's result and status, and leaves Perplexity's alone
    assert run_mode(browser, "generate", "word " * 400, **GEN) == "failed"
    assert tokens(browser) == [] and part(browser, "stats").text == "" and browser.find_element(By.ID, "error").is_displayed()
    browser.find_element(By.ID, "tab-perplexity").click()
    assert status() == "done" and not browser.find_element(By.ID, "error").is_displayed() and text("perplexity") == scored
    browser.find_element(By.ID, "tab-generate").click()
    assert status() == "failed" and browser.find_element(By.ID, "error").text.startswith("Too long for this model:")
    assert all("status of 400" in m for m in console_errors(browser))
