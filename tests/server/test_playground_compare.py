"""Compare mode in real headless Chromium: one server with two checkpoints (CHIAR and its baseline),
the same prompt and seed on both, side by side."""

from __future__ import annotations

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.server import test_multi_model
from tests.server.conftest import ServerProcess
from tests.server.playground_driver import chromium, console_errors, open_page, run_mode

PROMPT = "The history of the city begins"
GEN = {"max_new_tokens": 6, "temperature": 0.9, "top_p": 1, "seed": 11}

# test_multi_model's server: the tiny CHIAR checkpoint and a tiny full-attention baseline
baseline_checkpoint, two_models = test_multi_model.baseline_checkpoint, test_multi_model.both


def test_compare_shows_both_models_side_by_side(two_models: ServerProcess) -> None:
    models = httpx.get(two_models.url + "/v1/models", timeout=10).json()["data"]
    assert sorted(m["arch"] for m in models) == ["baseline", "chiar"]
    by_arch = {m["arch"]: m["id"] for m in models}
    with chromium() as driver:
        open_page(driver, two_models.url)
        assert run_mode(driver, "compare", PROMPT, **GEN) == "done", driver.find_element(By.ID, "error").text
        for pane, arch in (("pane-a", "chiar"), ("pane-b", "baseline")):
            box = driver.find_element(By.ID, pane)
            model = by_arch[arch]
            assert box.get_attribute("data-model") == model and model in box.find_element(By.TAG_NAME, "h3").text
            api = httpx.post(two_models.url + "/v1/generate", timeout=60, json={
                "prompt": PROMPT, **GEN, "model": model, "return_routing": True, "return_logprobs": True}).json()
            spans = box.find_elements(By.CSS_SELECTOR, ".tok")
            assert "".join(s.get_attribute("textContent") for s in spans) == PROMPT + api["text"]
            assert [float(s.get_attribute("data-logprob")) for s in spans] == api["logprobs"][1:]
            stats = {s.get_attribute("data-stat"): s for s in box.find_elements(By.CSS_SELECTOR, ".stat")}
            assert float(stats["stat-flops"].get_attribute("data-value")) == api["flops"]["ratio"]
            assert float(stats["stat-latency"].get_attribute("data-value")) > 0
        # Generate keeps its own colour-by and legend (not Compare's surprisal), and shows no compare result
        driver.find_element(By.ID, "tab-generate").click()
        assert Select(driver.find_element(By.ID, "colour_by")).first_selected_option.get_attribute("value") == "all"
        assert "share of routing layers" in driver.find_element(By.ID, "legend").text
        assert driver.find_elements(By.CSS_SELECTOR, "#result-generate .tokens .tok") == []
        assert not driver.find_element(By.ID, "pane-a").is_displayed() and driver.find_element(By.ID, "status").text == ""
        driver.find_element(By.ID, "tab-compare").click()
        assert Select(driver.find_element(By.ID, "colour_by")).first_selected_option.get_attribute("value") == "surprisal"
        assert all(driver.find_element(By.ID, p).find_elements(By.CSS_SELECTOR, ".tok") for p in ("pane-a", "pane-b"))
        assert driver.find_element(By.ID, "status").text == "done"
        assert console_errors(driver) == []
