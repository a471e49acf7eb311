"""Screenshots of each playground mode for the README (docs/img/playground-*.png), from real servers.

    python -m tests.server.playground_screenshots [--chiar checkpoints/chiar-small] [--baseline checkpoints/baseline-small]

The compare shot needs a server that takes several --checkpoint options; without --baseline it is skipped.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.server.conftest import REPO, ServerProcess
from tests.server.playground_driver import chromium, colour_by, console_errors, open_page, run_mode

OUT = REPO / "docs" / "img"
PROMPT = "The history of the city begins"
TEXT = (" Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role on the "
        "television series The Bill in 2000 . This was followed by a starring role in the play Herons written by Simon "
        "Stephens , which was performed in 2001 at the Royal Court Theatre .")
GEN = {"max_new_tokens": 40, "temperature": 0.8, "top_p": 0.95, "seed": 7}


def shot(driver: webdriver.Chrome, name: str, width: int = 1200) -> None:
    """The whole page at `width` CSS pixels."""
    driver.set_window_size(width, 800)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(height + 140, 4000))  # + the window's own chrome
    path = OUT / f"playground-{name}.png"
    driver.save_screenshot(str(path))
    print("wrote", path.relative_to(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chiar", type=Path, default=REPO / "checkpoints" / "chiar-small")
    parser.add_argument("--baseline", type=Path, default=None)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="chiar-shots-"))
    extra = ["--checkpoint", str(args.baseline)] if args.baseline else []
    server = ServerProcess(args.chiar, logs / "server.log", args=extra).start(ready_timeout=600)  # a busy machine loads slowly
    try:
        with chromium(1200, 900) as driver:
            open_page(driver, server.url)
            assert run_mode(driver, "generate", PROMPT, **GEN) == "done", driver.find_element(By.ID, "error").text
            driver.find_elements(By.CSS_SELECTOR, "#result-generate .tokens .tok")[9].click()
            shot(driver, "generate")
            colour_by(driver, "1")  # layer 2
            driver.find_elements(By.CSS_SELECTOR, "#result-generate .tokens .tok")[9].click()
            shot(driver, "layer")
            assert run_mode(driver, "perplexity", TEXT) == "done", driver.find_element(By.ID, "error").text
            colour_by(driver, "surprisal")
            shot(driver, "perplexity")
            shot(driver, "narrow", width=400)
            if args.baseline:
                assert run_mode(driver, "compare", PROMPT, **GEN) == "done", driver.find_element(By.ID, "error").text
                shot(driver, "compare")
            assert console_errors(driver) == []
    finally:
        server.stop()


if __name__ == "__main__":
    main()
