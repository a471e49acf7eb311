"""The routed prefix cache (issue 20): a server with the cache answers exactly what a server without it
answers (text, routing, log-probabilities to the bit: the kernels are batch- and chunking-invariant), for
prompts that share none, part, all or all but one token of a cached prefix, end in a partial block or
diverge inside one; on both demo checkpoints; one cache per model in a multi-model server."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess, metric, scrape
from tests.support import REPO

BOS = 1
rng = random.Random(20)
BASE = [BOS] + [rng.randrange(3, 380) for _ in range(63)]  # 64 tokens: 8 blocks of 8
VOLATILE = ("id", "created", "timing")


def fresh(n: int) -> list[int]:
    """n token ids no other prompt of this module starts a block with (a new suffix each call)."""
    return [rng.randrange(3, 380) for _ in range(n)]


# name -> (prompt from a suffix, cached tokens of a generation, of a request that needs every position's logprobs)
# A row starts from whole cached blocks and computes at least one token; a row that needs every position's
# logprobs also needs the block after the ones it starts from (it holds the log-probability of the first
# token the row computes). A scoring row's inputs stop one token short of its prompt (the last is only a target).
CASES = {
    "none": (lambda s: [BOS, *s, *fresh(30)], 0, 0),
    "part": (lambda s: BASE[:24] + s + fresh(12), 24, 16),
    "inside_a_block": (lambda s: BASE[:27] + s + fresh(12), 24, 16),
    "all": (lambda s: list(BASE), 56, 56),
    "all_but_one": (lambda s: BASE[:63], 56, 48),
    "partial_block_at_the_end": (lambda s: BASE + s[:3], 64, 56),
}


@pytest.fixture(scope="module")
def pair(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """The same model with and without the prefix cache; BASE's 8 blocks are cached with their log-probabilities on the first."""
    logs = tmp_path_factory.mktemp("prefix")
    on = ServerProcess(tiny_checkpoint, logs / "on.log").start()
    off = ServerProcess(tiny_checkpoint, logs / "off.log", args=["--no-prefix-cache"]).start()
    for proc in (on, off):
        r = httpx.post(proc.url + "/v1/completions", json={"prompt": [*BASE, 5], "max_tokens": 0, "echo": True, "logprobs": 1},
                       timeout=60)
        assert r.status_code == 200, r.text
    yield on, off
    on.stop()
    off.stop()


def stable(body: dict) -> dict:
    """The answer less what differs between runs and the cached tokens (FLOPs stay: a request pays for its
    tokens' routing whether or not they came from the cache)."""
    out = {k: v for k, v in body.items() if k not in VOLATILE}
    usage = dict(out.pop("usage", {}) or {})
    usage.pop("prompt_tokens_details", None)
    return {**out, "usage": usage}


def both(pair: tuple[ServerProcess, ServerProcess], path: str, body: dict) -> dict:
    """POST to both servers; the answers must be identical. Returns the cached server's answer."""
    answers = [httpx.post(proc.url + path, json=body, timeout=60) for proc in pair]
    for r in answers:
        assert r.status_code == 200, r.text
    on, off = (r.json() for r in answers)
    assert stable(on) == stable(off), path
    return on


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("case", list(CASES))
def test_cache_on_and_off_answer_identically_whatever_the_prompt_shares(pair: tuple[ServerProcess, ServerProcess], case: str) -> None:
    prompt, gen_cached, all_cached = CASES[case]
    # sampled generation with the sampled tokens' logprobs
    body = both(pair, "/v1/completions", {"prompt": prompt(fresh(8)), "max_tokens": 8, "temperature": 0.9, "seed": 7, "logprobs": 2})
    assert cached(body) == gen_cached
    # echo: every prompt position's logprob with alternatives, then generated tokens
    body = both(pair, "/v1/completions", {"prompt": prompt(fresh(8)), "max_tokens": 4, "echo": True, "logprobs": 3, "seed": 1})
    assert cached(body) == all_cached
    # scoring (lm-eval's loglikelihood): echo with max_tokens 0
    body = both(pair, "/v1/completions", {"prompt": prompt(fresh(8)), "max_tokens": 0, "echo": True, "logprobs": 5})
    assert cached(body) == all_cached
    assert body["choices"][0]["logprobs"]["token_logprobs"][0] is None  # the client's BOS: nothing predicts it


def test_routing_and_logprobs_of_text_prompts_match_through_the_cache(pair: tuple[ServerProcess, ServerProcess]) -> None:
    """Native routes: /v1/generate's routing trace and logprobs, /v1/perplexity's logprobs and routing."""
    text = (REPO / "data" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[2000:2160]
    first = both(pair, "/v1/generate", {"prompt": text, "max_new_tokens": 10, "return_routing": True, "return_logprobs": True,
                                        "temperature": 0.7, "seed": 3})
    again = both(pair, "/v1/generate", {"prompt": text[:110] + " and then", "max_new_tokens": 10, "return_routing": True,
                                        "return_logprobs": True, "temperature": 0.7, "seed": 3})
    assert cached(first) == 0 < cached(again)
    assert len(again["routing"]["operator"]) == again["usage"]["total_tokens"] - 1
    scored = both(pair, "/v1/perplexity", {"text": [text, text[:130]], "return_logprobs": True, "return_routing": True})
    assert cached(scored) > 0


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Both demo checkpoints in one server, with and without the cache."""
    logs = tmp_path_factory.mktemp("demo")
    args = ["--checkpoint", str(REPO / "checkpoints" / "baseline-small"), "--kv-cache-mb", "64"]
    on = ServerProcess(REPO / "checkpoints" / "chiar-small", logs / "on.log", args=args).start()
    off = ServerProcess(REPO / "checkpoints" / "chiar-small", logs / "off.log", args=[*args, "--no-prefix-cache"]).start()
    yield on, off
    on.stop()
    off.stop()


@pytest.mark.parametrize("model", ["chiar-small", "baseline-small"])
def test_both_demo_checkpoints_answer_identically_through_the_cache(demo_pair: tuple[ServerProcess, ServerProcess], model: str) -> None:
    text = (REPO / "data" / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:1500]
    context = {"model": model, "max_tokens": 0, "echo": True, "logprobs": 2}
    for k, tail in enumerate([" The", " In the year", " He was"]):  # lm-eval's shape: one context, several continuations
        body = both(demo_pair, "/v1/completions", {**context, "prompt": text + tail})
        assert (cached(body) > 200) == (k > 0)
    body = both(demo_pair, "/v1/completions", {"model": model, "prompt": text + " She", "max_tokens": 12, "temperature": 0.8,
                                               "seed": 11, "logprobs": 1})
    assert cached(body) > 200


def test_each_model_of_a_multi_model_server_has_its_own_cache(demo_pair: tuple[ServerProcess, ServerProcess]) -> None:
    on = demo_pair[0]
    client = openai.OpenAI(base_url=on.url + "/v1", api_key="unused", max_retries=0)
    prompt = (REPO / "data" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[5000:6000]
    before = scrape(on.url)
    first = client.completions.create(model="chiar-small", prompt=prompt, max_tokens=1)
    other = client.completions.create(model="baseline-small", prompt=prompt, max_tokens=1)  # its own, empty for this prompt
    again = client.completions.create(model="baseline-small", prompt=prompt, max_tokens=1)
    assert first.usage.prompt_tokens_details.cached_tokens == 0 and other.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    after = scrape(on.url)
    hits = {
        m: metric(after, "chiar_prefix_cache_hit_tokens_total", model=m) - metric(before, "chiar_prefix_cache_hit_tokens_total", model=m)
        for m in ("chiar-small", "baseline-small")
    }
    assert hits == {"chiar-small": 0, "baseline-small": again.usage.prompt_tokens_details.cached_tokens}
    for m in ("chiar-small", "baseline-small"):
        assert metric(after, "chiar_prefix_cache_tokens", model=m) > 0
        assert metric(after, "chiar_prefix_cache_bytes", model=m) <= metric(after, "chiar_kv_cache_bytes", model=m, kind="used")
