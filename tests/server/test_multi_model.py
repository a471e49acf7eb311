"""Compare mode: one server, several checkpoints (`--checkpoint` repeated), each request picks one by `model`.

Real server processes: the tiny CHIAR checkpoint (the default) and a tiny full-attention baseline with
a longer context, so every answer shows which model served it (arch, max_model_len, text).
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from server.engine.turns import DeviceTurns
from tests.server.conftest import REPO, ServerProcess, metric, scrape

CHIAR, BASELINE = "chiar-tiny", "baseline-tiny"


@pytest.fixture(scope="module")
def baseline_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-attention baseline with the tiny model's tokenizer and a 512-token context."""
    import torch
    from tokenizers import Tokenizer

    from model import ChiarConfig, ChiarLM, save_checkpoint

    config = ChiarConfig.from_json((tiny_checkpoint / "config.json").read_text()).replace(
        arch="baseline", thresholds=None, max_seq_len=512)
    torch.manual_seed(1)
    model = ChiarLM(config).eval()
    path = tmp_path_factory.mktemp("baseline_checkpoint") / BASELINE
    save_checkpoint(model, Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")), path)
    return path


@pytest.fixture(scope="module")
def both(tiny_checkpoint: Path, baseline_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "multi.log",
                         # a generous drain timeout: the drain test checks that both engines finish, not how fast
                         args=["--checkpoint", str(baseline_checkpoint), "--drain-timeout", "300"]).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def baseline_alone(baseline_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(baseline_checkpoint, tmp_path_factory.mktemp("logs") / "baseline.log").start()
    yield proc
    proc.stop()


def test_models_lists_every_checkpoint_default_first(both: ServerProcess) -> None:
    data = httpx.get(both.url + "/v1/models").json()["data"]
    assert [(m["id"], m["arch"], m["max_model_len"]) for m in data] == [(CHIAR, "chiar", 127), (BASELINE, "baseline", 511)]
    assert httpx.get(f"{both.url}/v1/models/{BASELINE}").json()["arch"] == "baseline"
    ready = httpx.get(both.url + "/ready").json()
    assert ready == {"status": "ready", "model": CHIAR, "models": [CHIAR, BASELINE]}
    client = OpenAI(base_url=both.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [CHIAR, BASELINE]
    out = client.completions.create(model=BASELINE, prompt="The city", max_tokens=5, temperature=0)
    assert out.model == BASELINE and out.usage.completion_tokens == 5


# (method, path, body or query) per endpoint; `model` is added for the model under test
CALLS: list[tuple[str, str, dict]] = [
    ("POST", "/v1/generate", {"prompt": "The history of", "max_new_tokens": 8, "seed": 3}),
    ("POST", "/v1/perplexity", {"text": "Robert Boulter is an English film actor ."}),
    ("POST", "/v1/completions", {"prompt": "The history of", "max_tokens": 6, "seed": 5, "logprobs": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "seed": 7}),
    ("POST", "/v1/tokenize", {"text": "The city"}),
    ("POST", "/tokenize", {"prompt": "The city"}),
    ("POST", "/detokenize", {"tokens": [40, 41, 42]}),
    ("GET", "/tokenizer_info", {}),
]
VOLATILE = ("id", "created", "timing", "system_fingerprint")


def call(url: str, method: str, path: str, body: dict, model: str | None) -> httpx.Response:
    if method == "GET":
        return httpx.get(url + path, params={} if model is None else {"model": model}, timeout=60)
    return httpx.post(url + path, json=body if model is None else {**body, "model": model}, timeout=60)


def stable(data: dict) -> dict:
    """The answer less what differs between runs, and less the prompt tokens the server had cached."""
    out = {k: v for k, v in data.items() if k not in VOLATILE}
    if isinstance(out.get("usage"), dict):
        out["usage"] = {k: v for k, v in out["usage"].items() if k != "prompt_tokens_details"}
    return out


@pytest.mark.parametrize(("method", "path", "body"), CALLS, ids=[c[1] for c in CALLS])
def test_each_endpoint_serves_each_model_as_a_single_model_server_does(
        both: ServerProcess, server: ServerProcess, baseline_alone: ServerProcess, method: str, path: str, body: dict) -> None:
    for model, alone in ((CHIAR, server), (BASELINE, baseline_alone)):
        r = call(both.url, method, path, body, model)
        assert r.status_code == 200, r.text
        expected = call(alone.url, method, path, body, None).json()
        assert stable(r.json()) == stable(expected), (model, path)
        if "model" in r.json():
            assert r.json()["model"] == model
    default = call(both.url, method, path, body, None)  # no model: the first checkpoint
    assert stable(default.json()) == stable(call(server.url, method, path, body, None).json())


def test_perplexity_text_takes_model_from_the_query(both: ServerProcess, baseline_alone: ServerProcess) -> None:
    text = "Robert Boulter is an English film actor ."
    r = httpx.post(both.url + "/v1/perplexity/text", params={"model": BASELINE}, content=text.encode(),
                   headers={"Content-Type": "text/plain"}, timeout=60)
    alone = httpx.post(baseline_alone.url + "/v1/perplexity/text", content=text.encode(),
                       headers={"Content-Type": "text/plain"}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == BASELINE
    assert r.json()["results"] == alone.json()["results"]


@pytest.mark.parametrize(("method", "path", "body"), [*CALLS, ("GET", "/v1/models/nope", {}),
                                                      ("POST", "/v1/perplexity/text", {})], ids=lambda c: str(c))
def test_unknown_model_is_404_naming_the_served_ids(both: ServerProcess, method: str, path: str, body: dict) -> None:
    if path == "/v1/perplexity/text":
        r = httpx.post(both.url + path, params={"model": "nope"}, content=b"some text", headers={"Content-Type": "text/plain"})
    else:
        r = call(both.url, method, path, body, "nope")
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert CHIAR in error["message"] and BASELINE in error["message"] and "'nope'" in error["message"]


def test_metrics_carry_each_model(both: ServerProcess) -> None:
    for model in (CHIAR, BASELINE):
        httpx.post(both.url + "/v1/generate", json={"model": model, "prompt": "x", "max_new_tokens": 3}, timeout=60)
    samples = scrape(both.url)
    for model, arch in ((CHIAR, "chiar"), (BASELINE, "baseline")):
        assert metric(samples, "chiar_model_info", model=model, arch=arch) == 1
        assert metric(samples, "chiar_generation_tokens_total", model=model) >= 3
        assert metric(samples, "chiar_request_duration_seconds_count", model=model, endpoint="/v1/generate", status="200") >= 1
        assert metric(samples, "chiar_kv_cache_bytes", model=model, kind="limit") == 256 * 2**20  # half of the 512 MiB default
    # the baseline routes every token to attention; the CHIAR model does not
    assert metric(samples, "chiar_tokens_routed_total", model=BASELINE, operator="dct") == 0
    assert metric(samples, "chiar_tokens_routed_total", model=CHIAR, operator="dct") > 0


def test_short_request_on_one_model_finishes_during_a_flood_on_the_other(both: ServerProcess) -> None:
    """Fair sharing: long streams on the baseline do not hold the device; a short CHIAR generation
    sent after they started completes while every one of them is still streaming."""
    started = threading.Barrier(5)
    finished: list[str] = []
    stop = threading.Event()

    def flood(k: int) -> None:
        body = {"model": BASELINE, "prompt": f"flood {k}", "max_new_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", both.url + "/v1/generate", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            started.wait(60)
            for line in lines:
                if stop.is_set():
                    return  # closing the stream cancels the request
                if line == "data: [DONE]":
                    finished.append(f"flood {k}")

    threads = [threading.Thread(target=flood, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    try:
        started.wait(60)
        r = httpx.post(both.url + "/v1/generate", json={"model": CHIAR, "prompt": "x", "max_new_tokens": 4, "ignore_eos": True},
                       timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert finished == [], "the short request waited for the flood on the other model"
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def test_sigterm_drains_every_engine(both: ServerProcess) -> None:
    """Streams in flight on both models when SIGTERM arrives all finish; the server then exits 0.
    (Stops the module's server: keep this the last test that uses it.)"""
    done: dict[str, dict] = {}
    first = threading.Barrier(3)

    def stream(model: str, new: int) -> None:
        body = {"model": model, "prompt": "drain", "max_new_tokens": new, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", both.url + "/v1/generate", json=body, timeout=120) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data:"))
            next(lines)
            first.wait(60)
            for line in lines:
                if '"type":"done"' in line:
                    done[model] = json.loads(line.removeprefix("data: "))

    threads = [threading.Thread(target=stream, args=a, daemon=True) for a in ((CHIAR, 40), (BASELINE, 80))]
    for t in threads:
        t.start()
    first.wait(60)
    assert both.proc is not None
    both.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert both.proc.wait(120) == 0, both.log()
    assert {m: d["usage"]["completion_tokens"] for m, d in done.items()} == {CHIAR: 40, BASELINE: 80}


def test_device_turns_alternate_between_busy_engines() -> None:
    """FIFO turns: while both threads want the device they alternate. A plain lock does not: the thread
    that releases it usually takes it again at once (about every other turn repeats a thread)."""
    turns = DeviceTurns()
    order: list[str] = []
    go = threading.Barrier(2)

    def engine(name: str) -> None:
        go.wait()
        for _ in range(20):
            with turns.turn():
                order.append(name)
                start = time.perf_counter()
                while time.perf_counter() - start < 0.002:  # a step that holds the GIL, like Python-side engine work
                    pass

    threads = [threading.Thread(target=engine, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(order) == ["a"] * 20 + ["b"] * 20
    # while both want the device: from the first turn of the later starter (on a loaded machine the first
    # thread can take several turns before the second is scheduled at all) until one thread is done
    first = next(i for i, n in enumerate(order) if n != order[0])
    both_busy = order[first - 1: max(i for i, n in enumerate(order) if n != order[-1]) + 1]
    repeats = sum(1 for prev, cur in itertools.pairwise(both_busy) if prev == cur)
    assert repeats <= 4, "".join(order)


def test_duplicate_model_ids_are_refused_at_startup(tiny_checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere" / tiny_checkpoint.name  # the check comes before loading: no files needed
    other.mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(tiny_checkpoint), "--checkpoint", str(other)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert str(tiny_checkpoint) in result.stderr and str(other) in result.stderr and f"'{tiny_checkpoint.name}'" in result.stderr
