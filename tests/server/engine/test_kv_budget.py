"""The KV-cache budget (issue 12 item 2): admission counts each sequence's measured routed cache,
a request that could never fit is refused with a clear 400, and /metrics exports the used bytes and the limit."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.engine.requests import GenerateJob, GenParams
from server.engine.scheduler import CostModel, Scheduler, SchedulerLimits
from tests.server.conftest import ServerProcess, metric, scrape
from tests.support import ran

LOOP = asyncio.new_event_loop()
BUDGET_MB = 0.02  # 20,971 bytes; the tiny model holds 768 bytes per token attending in its 3 attention layers


def gen(n_prompt: int, new: int = 4) -> GenerateJob:
    return GenerateJob(list(range(1, n_prompt + 1)), GenParams(max_new_tokens=new), queue=asyncio.Queue(), loop=LOOP,
                       index=0, timeout=1e9)


def admitted_after_measuring(share: float) -> int:
    """Requests admitted under one budget once a running sequence's cache measured `share` of full attention."""
    s = Scheduler(SchedulerLimits(max_batch_size=64, queue_size=100, max_step_tokens=100_000, step_target_seconds=0.05,
                                  kv_budget_bytes=20 * 100 * 100, kv_bytes_per_token=100.0, max_seq_len=1024))
    first = gen(96)
    s.add([first])
    out = s.schedule(0.0)
    # the runner measured 100 tokens in the cache holding `share` of the full-attention bytes
    s.update_from_output(out, ran(out, 1e-4), [], [first], int(100 * 100 * share), (int(100 * 100 * share), 100))
    s.kv_share = share  # as if measured for a while (the moving average converges to it)
    s.cost = CostModel(chunk_seconds_per_token=1e-9)  # the step budget never binds: only admission does
    s.add([gen(96) for _ in range(40)])
    s.schedule(0.01)
    return len(s.running) + len(s.prefilling)


def test_a_smaller_measured_cache_admits_more_sequences() -> None:
    full, half = admitted_after_measuring(1.0), admitted_after_measuring(0.5)
    # the first holds 100 tokens and may add 4; each newcomer may hold 100: 19 fit 200 KB at full attention
    assert full == 19
    # half the cache per sequence, reserved with 10% headroom (0.55): 1 + 35 sequences
    assert half == 36
    # the estimate is what a sequence may hold alone (10% headroom, its partly filled blocks), capped at the context
    s = Scheduler(SchedulerLimits(8, 10, 512, 0.05, 10**6, 100.0, 64, kv_rounding_bytes=300))
    s.kv_share = 0.5
    assert s.kv_needed(40) == 40 * 55 + 300 and s.kv_needed(1000) == 64 * 55 + 300


@pytest.fixture(scope="module")
def small_kv_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("kv") / "server.log",
                         args=["--kv-cache-mb", str(BUDGET_MB), "--max-batch-size", "64"]).start()
    yield proc
    proc.stop()


def prompt_of(url: str, n: int) -> str:
    """The shortest prompt of at least n tokens (BOS excluded)."""
    words = 1
    while True:
        text = "the " * words
        count = httpx.post(url + "/v1/tokenize", json={"text": text, "add_bos": False}).json()["count"]
        if count >= n:
            return text
        words += 1


def test_a_request_that_can_never_fit_gets_a_clear_400(small_kv_server: ServerProcess) -> None:
    url = small_kv_server.url
    # whatever share the routers pick, each token attends at least in the last layer: 256 bytes;
    # 20 + 100 tokens need >= 30 KB > 20.97 KB, while the 20-token prompt alone fits even at full attention
    r = httpx.post(url + "/v1/generate", json={"prompt": prompt_of(url, 19), "max_new_tokens": 100})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "max_new_tokens" and err["code"] == "kv_cache_exceeded"
    assert "--kv-cache-mb" in err["message"] and "0.02 MiB" in err["message"]
    r = httpx.post(url + "/v1/generate", json={"prompt": prompt_of(url, 110), "max_new_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(url + "/v1/completions", json={"model": "chiar-tiny", "prompt": prompt_of(url, 19), "max_tokens": 100})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    # a request that fits is served
    r = httpx.post(url + "/v1/generate", json={"prompt": prompt_of(url, 5), "max_new_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200, r.text


def test_metrics_show_kv_bytes_used_and_the_limit_and_admission_keeps_within_it(small_kv_server: ServerProcess) -> None:
    url = small_kv_server.url
    prompt = prompt_of(url, 12)  # 13 + 12 tokens: <= 19.2 KB each; the pool of 10 blocks holds one or two, not 8
    peaks = {"used": 0.0}
    stop = threading.Event()
    before = scrape(url)

    def poll() -> None:
        while not stop.is_set():
            samples = scrape(url)
            peaks["used"] = max(peaks["used"], metric(samples, "chiar_kv_cache_bytes", kind="used"))
            time.sleep(0.005)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {"prompt": prompt, "max_new_tokens": 12, "ignore_eos": True}
            return [r.status_code for r in await asyncio.gather(*(client.post("/v1/generate", json=body) for _ in range(8)))]

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        statuses = asyncio.run(burst())
    finally:
        stop.set()
        poller.join()
    assert statuses == [200] * 8
    samples = scrape(url)
    limit = metric(samples, "chiar_kv_cache_bytes", kind="limit")
    assert limit == int(BUDGET_MB * 2**20)
    assert 0 < peaks["used"] <= limit
    # the budget, not the batch cap (64), held the rest back: no decode forward ran more than 4 sequences
    decodes = metric(samples, "chiar_batch_size_count", phase="decode") - metric(before, "chiar_batch_size_count", phase="decode")
    at_most_4 = metric(samples, "chiar_batch_size_bucket", phase="decode", le="4.0") - \
        metric(before, "chiar_batch_size_bucket", phase="decode", le="4.0")
    assert decodes >= 11 and at_most_4 == decodes


def test_the_automatic_batch_cap_leaves_the_cache_to_admission(tiny_checkpoint: Path) -> None:
    from model import load_checkpoint
    from model.kv_cache import PagedKVCache
    from server.engine.engine import MAX_AUTO_BATCH, auto_batch_cap

    model, _ = load_checkpoint(tiny_checkpoint)
    full_seq = model.kv_bytes_per_token() * model.config.max_seq_len  # 3 attention layers x 128 tokens
    smallest = model.attention_layers() * PagedKVCache.bytes_per_block(model)  # one block per attending layer
    # a budget of 2 full-context sequences still runs 32 short ones together: their KV is admission's to count
    assert auto_batch_cap(model, int(2 * full_seq)) == 2 * model.config.max_seq_len // 8 == 32
    assert auto_batch_cap(model, 5 * smallest) == 5
    assert auto_batch_cap(model, 10**12) == MAX_AUTO_BATCH
    assert auto_batch_cap(model, 1) == 1
