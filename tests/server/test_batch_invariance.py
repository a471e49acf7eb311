"""A seed means one text: seeded requests give the same bytes alone and under any load (issue 23, item 2).

The native kernels compute every token with one fixed order of operations whatever its batch
neighbours and however its prompt is chunked, and sampling draws from each request's own generator,
so a seeded completion's text, tokens and log-probabilities are byte-identical alone and beside other
generations, long prompts being prefilled in chunks, and perplexity scoring.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess

SEEDED = [{"prompt": f"The {word} of the city was", "max_tokens": 24, "temperature": 0.8, "top_p": 0.95, "seed": 700 + i,
           "logprobs": 3} for i, word in enumerate(["history", "mayor", "river", "bridge"])]


def completion(url: str, body: dict, cached: list[int] | None = None) -> str:
    """The response's bytes that a seed fixes: its choices and token counts. How many prompt tokens came
    from the prefix cache (`usage.prompt_tokens_details.cached_tokens`) depends on what ran before, so it is
    left out, and appended to `cached`."""
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    usage = dict(out["usage"])
    details = usage.pop("prompt_tokens_details", None) or {}
    if cached is not None:
        cached.append(details.get("cached_tokens", 0))
    return json.dumps({"choices": out["choices"], "usage": usage}, sort_keys=True)


def load(url: str, round_: int) -> list[tuple[str, dict]]:
    """A different mix of other work each round: generations of other lengths, a long prompt that is
    prefilled in chunks, perplexity scoring."""
    long_prompt = " ".join(["the cat sat on the mat and looked at the door"] * (2 + round_))  # 40-85 tokens of the 128 the test model holds
    other = [("/v1/completions", {"prompt": f"Another {k} words", "max_tokens": 8 + 5 * k, "temperature": 0.5 + 0.1 * k,
                                  "seed": k}) for k in range(round_ + 1)]
    other.append(("/v1/completions", {"prompt": long_prompt, "max_tokens": 4}))
    other.append(("/v1/perplexity", {"text": long_prompt}))
    return other


@pytest.fixture(scope="module")
def small_step_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A step target so small that long prompts are prefilled in several chunks beside the decodes."""
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("invariance") / "server.log",
                         args=["--step-target-ms", "1"]).start()
    yield proc
    proc.stop()


def test_seeded_requests_give_the_same_bytes_alone_and_under_load(small_step_server: ServerProcess) -> None:
    url = small_step_server.url
    alone = [completion(url, body) for body in SEEDED]
    cached: list[int] = []
    for round_ in range(3):
        others = load(url, round_)
        with ThreadPoolExecutor(len(SEEDED) + len(others)) as pool:
            extra = [pool.submit(httpx.post, url + path, json=body, timeout=120) for path, body in others]
            loaded = list(pool.map(lambda body: completion(url, body, cached), SEEDED))
            assert [f.result().status_code for f in extra] == [200] * len(extra), [f.result().text for f in extra]
        assert loaded == alone, f"round {round_}: a seeded request gave other bytes under load"
    assert all(cached), f"the repeated prompts start from their cached prefix (the same bytes either way): {cached}"
