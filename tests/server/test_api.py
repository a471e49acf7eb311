"""Generation, perplexity, tokenize and the OpenAI API against a real server process."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from model import Operator, load_checkpoint
from model.generate import generate as generate_tokens
from tests.server.conftest import ServerProcess
from tests.support import WIKI

PROMPT = "The history of the city begins"


@pytest.fixture(scope="module")
def local(tiny_checkpoint: Path):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    return model, tokenizer


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def generate(client: httpx.Client, **body) -> dict:
    r = client.post("/v1/generate", json={"prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(local, text: str) -> list[int]:
    model, tokenizer = local
    return [model.config.bos_token_id, *tokenizer.encode(text, add_special_tokens=False).ids]


# ---------------------------------------------------------------------------- health, docs, playground
def test_health_ready_docs_playground(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    schema = client.get("/openapi.json").json()
    for path in ("/v1/generate", "/v1/perplexity", "/v1/completions", "/v1/models", "/v1/tokenize"):
        assert path in schema["paths"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="result-generate"' in page.text and "/static/app.js" in page.text
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert "return_routing" in client.get("/static/app.js").text


# ---------------------------------------------------------------------------- generate
def test_generate_greedy_matches_model_generate(client: httpx.Client, local) -> None:
    body = generate(client, max_new_tokens=12, temperature=0, ignore_eos=True)
    model, tokenizer = local
    ids = torch.tensor([ids_of(local, PROMPT)])
    expected = generate_tokens(model, ids, 12, temperature=0.0).tokens[0]
    assert body["token_ids"] == expected
    assert body["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": ids.shape[1], "completion_tokens": 12, "total_tokens": ids.shape[1] + 12,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    t = body["timing"]
    assert 0 <= t["queue_seconds"] <= t["time_to_first_token_seconds"] <= t["total_seconds"]
    assert 0 < body["flops"]["executed"] < body["flops"]["dense"]  # hard gating skipped work
    assert body["flops"]["ratio"] == pytest.approx(body["flops"]["executed"] / body["flops"]["dense"])


def test_generate_seeded_sampling_is_reproducible(client: httpx.Client) -> None:
    a = generate(client, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    b = generate(client, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    c = generate(client, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=8, ignore_eos=True)
    assert a["token_ids"] == b["token_ids"]
    assert a["token_ids"] != c["token_ids"]


def test_generate_stream_equals_non_stream(client: httpx.Client) -> None:
    plain = generate(client, max_new_tokens=20, seed=3, ignore_eos=True)
    with client.stream("POST", "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 20, "seed": 3, "ignore_eos": True,
                                                      "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    tokens = [e for e in events[:-1] if e["type"] == "token"]
    done = events[-2]
    assert done["type"] == "done"
    assert len(tokens) == 20
    assert "".join(e["text"] for e in tokens) == plain["text"] == done["text"]
    assert [t for e in tokens for t in e["token_ids"]] == plain["token_ids"] == done["token_ids"]


def test_generate_stop_string_cuts_text(client: httpx.Client) -> None:
    full = generate(client, max_new_tokens=30, temperature=0, ignore_eos=True)
    text = full["text"]
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    cut = generate(client, max_new_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.index(stop)]
    with client.stream("POST", "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 30, "temperature": 0, "ignore_eos": True,
                                                      "stop": stop, "stream": True}) as r:
        events = sse_events(r)
    assert "".join(e["text"] for e in events[:-1] if e["type"] == "token") == cut["text"]
    assert events[-2]["finish_reason"] == "stop"


def test_generate_return_routing(client: httpx.Client, local) -> None:
    body = generate(client, max_new_tokens=6, temperature=0, ignore_eos=True, return_routing=True)
    routing = body["routing"]
    model, _ = local
    n_layers = model.config.n_layers
    prompt_ids = ids_of(local, PROMPT)
    processed = len(prompt_ids) + 6 - 1  # the last token is sampled, never fed back
    assert routing["prompt_tokens"] == len(prompt_ids)
    assert routing["token_ids"] == (prompt_ids + body["token_ids"])[:processed]
    assert len(routing["tokens"]) == len(routing["operator"]) == len(routing["entropy"]) == len(routing["gate"]) == processed
    assert routing["operator_names"] == ["identity", "dct", "rbf", "attention"]
    routed = list(model.config.routing_layers)
    dct, attention = Operator.DCT, Operator.ATTENTION
    for ops, ents in zip(routing["operator"], routing["entropy"]):
        assert len(ops) == len(ents) == n_layers
        assert ops[0] in (Operator.IDENTITY, dct) and ops[-1] == attention and all(ops[i] in (dct, attention) for i in routed)
        assert all(ents[i] is not None and 0 <= ents[i] <= 1 for i in routed)
    ops = torch.tensor(routing["operator"])
    assert (ops[:, routed] == attention).any() and (ops[:, routed] == dct).any()  # both operators used
    # routing of the prompt equals the model's own inference path
    out = model.infer(torch.tensor([prompt_ids]))
    assert ops[: len(prompt_ids)].tolist() == out.routing.operator[0].long().tolist()
    assert all(0 < g < 1 for g in routing["gate"])


# ---------------------------------------------------------------------------- perplexity
def test_perplexity_matches_model_api(client: httpx.Client, local) -> None:
    model, _ = local
    texts = ["The cat sat on the mat.", "Robert Boulter is an English film , television and theatre actor ."]
    r = client.post("/v1/perplexity", json={"text": texts, "return_logprobs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    for text, result in zip(texts, body["results"]):
        ids = torch.tensor([ids_of(local, text)])
        logp = torch.log_softmax(model.infer(ids).logits[0, :-1].double(), -1)
        expected = logp.gather(1, ids[0, 1:, None])[:, 0]
        nll = -float(expected.sum())
        assert result["tokens"] == ids.shape[1] - 1
        assert result["nll"] == pytest.approx(nll, rel=1e-4)
        assert [e["logprob"] for e in result["logprobs"]] == pytest.approx(expected.tolist(), abs=1e-4)
        assert [e["id"] for e in result["logprobs"]] == ids[0, 1:].tolist()
        # the reference (training) path with hard gating agrees too
        with torch.no_grad():
            ref = model(ids, hard=True, labels=torch.cat([ids[:, 1:], torch.tensor([[-100]])], 1))
        assert float(ref.loss) * result["tokens"] == pytest.approx(nll, rel=1e-3)
        words, n_bytes = len(text.split()), len(text.encode())
        assert result["words"] == words and result["bytes"] == n_bytes
        assert result["perplexity"] == pytest.approx(math.exp(nll / result["tokens"]), rel=1e-4)
        assert result["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-4)
        assert result["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-4)
        counts = torch.tensor(result["routing"]["per_layer"])
        assert counts.sum(1).tolist() == [result["tokens"]] * model.config.n_layers
        assert counts.tolist() == model.infer(ids[:, :-1]).routing.counts.tolist()
        # FLOPs of the text's forward (one window here): the model's own accounting, chunked or not
        flops = model.infer(ids[:, :-1]).flops
        assert result["flops"]["executed"] == pytest.approx(flops.per_sequence_executed[0], rel=1e-6)
        assert result["flops"]["dense"] == pytest.approx(flops.per_sequence_dense[0], rel=1e-6)
        assert 0 < result["flops"]["ratio"] < 1


def test_perplexity_sliding_window_matches_independent_computation(client: httpx.Client, local) -> None:
    model, _ = local
    text = (WIKI / "test.txt").read_text(encoding="utf-8")[:1500]
    ids = ids_of(local, text)
    window, stride = model.config.max_seq_len, 48
    n = len(ids) - 1
    assert n > 3 * window
    r = client.post("/v1/perplexity", json={"text": text, "stride": stride, "return_logprobs": True})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert r.json()["window"] == window and r.json()["stride"] == stride
    # target j (1..n) is scored in the first window [k*stride, k*stride + window) whose inputs reach j-1
    expected = []
    cache: dict[int, torch.Tensor] = {}
    for j in range(1, n + 1):
        k = max(0, math.ceil((j - window) / stride))
        begin = k * stride
        if begin not in cache:
            chunk = torch.tensor([ids[begin: min(begin + window, n)]])
            cache[begin] = torch.log_softmax(model.infer(chunk).logits[0].double(), -1)
        expected.append(float(cache[begin][j - 1 - begin, ids[j]]))
    assert result["tokens"] == n
    assert result["windows"] == len(cache)
    assert [e["logprob"] for e in result["logprobs"]] == pytest.approx(expected, abs=1e-4)
    assert result["nll"] == pytest.approx(-sum(expected), rel=1e-5)


def test_tokenize_and_models(client: httpx.Client, local, oai: openai.OpenAI) -> None:
    r = client.post("/v1/tokenize", json={"text": PROMPT}).json()
    assert r["token_ids"] == ids_of(local, PROMPT)
    assert r["count"] == len(r["token_ids"]) and r["tokens"][0] == "<bos>"
    assert r["max_context"] == local[0].config.max_seq_len
    assert client.post("/v1/tokenize", json={"text": PROMPT, "add_bos": False}).json()["token_ids"] == ids_of(local, PROMPT)[1:]
    # a user typing a special token's text gets text, not a control token
    assert 2 not in client.post("/v1/tokenize", json={"text": "<eos>"}).json()["token_ids"]
    models = oai.models.list().data
    assert [m.id for m in models] == ["chiar-tiny"]


# ---------------------------------------------------------------------------- OpenAI completions
def test_openai_completion_matches_native(client: httpx.Client, oai: openai.OpenAI) -> None:
    native = generate(client, max_new_tokens=10, temperature=0, ignore_eos=True)
    completion = oai.completions.create(model="chiar-tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    choice = completion.choices[0]
    if 2 not in native["token_ids"]:
        assert choice.text == native["text"]
        assert choice.finish_reason == "length"
    assert completion.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    chunks = list(oai.completions.create(model="chiar-tiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


def test_openai_echo_logprobs_scores_prompt(client: httpx.Client, oai: openai.OpenAI, local) -> None:
    text = "The cat sat on the mat."
    completion = oai.completions.create(model="chiar-tiny", prompt=text, max_tokens=0, echo=True, logprobs=5)
    choice = completion.choices[0]
    assert choice.text == text
    ppl = client.post("/v1/perplexity", json={"text": text, "return_logprobs": True}).json()["results"][0]
    assert choice.logprobs.token_logprobs == pytest.approx([e["logprob"] for e in ppl["logprobs"]], abs=1e-5)
    assert choice.logprobs.tokens == [e["token"] for e in ppl["logprobs"]]
    assert all(len(top) == 5 for top in choice.logprobs.top_logprobs)
    for lp, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert max(top.values()) >= lp - 1e-6  # the best alternative is at least as likely
    offsets = choice.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text)
    # token-id prompts (how evaluation harnesses send them) score the same
    ids = ids_of(local, text)[1:]
    by_ids = oai.completions.create(model="chiar-tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    assert by_ids.choices[0].logprobs.token_logprobs == pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)
    assert by_ids.choices[0].text == text


def test_openai_echo_with_generation_and_logprobs(oai: openai.OpenAI) -> None:
    completion = oai.completions.create(model="chiar-tiny", prompt=[PROMPT, "A second prompt"], max_tokens=4, echo=True,
                                        logprobs=2, n=2, seed=11, temperature=1.0)
    assert len(completion.choices) == 4
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    for c in completion.choices:
        prompt = PROMPT if c.index < 2 else "A second prompt"
        assert c.text.startswith(prompt)
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert all(x <= 0 for x in lp.token_logprobs)
        assert all(len(t) <= 2 for t in lp.top_logprobs)
    again = oai.completions.create(model="chiar-tiny", prompt=[PROMPT, "A second prompt"], max_tokens=4, echo=True,
                                   logprobs=2, n=2, seed=11, temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in completion.choices]


def test_openai_stop_and_errors(oai: openai.OpenAI) -> None:
    full = oai.completions.create(model="chiar-tiny", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    candidates = [full[i:i + 2] for i in range(2, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2]]
    if candidates:
        cut = oai.completions.create(model="chiar-tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[candidates[0]])
        assert cut.choices[0].text == full[: full.index(candidates[0])]
        assert cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="chiar-tiny", prompt=PROMPT, max_tokens=1, logprobs=6)
    assert err.value.body["param"] == "logprobs"
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=1)


# ---------------------------------------------------------------------------- batching invariance
def test_same_seed_same_text_alone_and_under_load(server: ServerProcess) -> None:
    targets = [{"prompt": PROMPT, "max_new_tokens": 40, "temperature": 0.9, "seed": 1234, "ignore_eos": True},
               {"prompt": "In 1990 the band", "max_new_tokens": 25, "temperature": 0, "ignore_eos": True}]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        alone_bodies = [c.post("/v1/generate", json=t).json() for t in targets]
        alone = [b["token_ids"] for b in alone_bodies]
        alone_flops = [b["flops"] for b in alone_bodies]
        before = c.get("/metrics").text

    def one(i: int) -> tuple[int, list[int], dict]:
        body = targets[i % 2] if i % 5 == 2 else {
            "prompt": f"Noise prompt number {i} " * (1 + i % 4), "max_new_tokens": 10 + 7 * (i % 5),
            "temperature": 1.0, "seed": i, "ignore_eos": True}
        r = httpx.post(server.url + "/v1/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return i, r.json()["token_ids"], r.json()["flops"]

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    checked = 0
    for i, tokens, flops in results:
        if i % 5 == 2:
            assert tokens == alone[i % 2], f"request {i} changed under load"
            # a request's FLOPs are its own, whoever shares the batch
            assert flops["executed"] == pytest.approx(alone_flops[i % 2]["executed"], rel=1e-12)
            assert flops["dense"] == pytest.approx(alone_flops[i % 2]["dense"], rel=1e-12)
            checked += 1
    assert checked >= 4
    # the load really was batched: some decode steps ran with more than one sequence
    after = httpx.get(server.url + "/metrics").text

    def decode_batches(text: str, bucket: str) -> float:
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == "chiar_batch_size_bucket" and s.labels["le"] == bucket and s.labels["phase"] == "decode")

    grew_total = decode_batches(after, "+Inf") - decode_batches(before, "+Inf")
    grew_single = decode_batches(after, "1.0") - decode_batches(before, "1.0")
    assert grew_total > grew_single
