"""The per-token data the playground draws: generate logprobs, router thresholds, perplexity's token routing."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from model import Operator
from tests.server import test_api
from tests.server.test_api import PROMPT, WIKI, ids_of

local = test_api.local  # test_api's in-process copy of the served model (`client` is conftest's)


def test_generate_logprobs_cover_prompt_and_generated_tokens(client: httpx.Client, local) -> None:
    model, _ = local
    body = {"prompt": PROMPT, "max_new_tokens": 5, "temperature": 0.9, "seed": 3, "ignore_eos": True,
            "return_routing": True, "return_logprobs": True}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = ids_of(local, PROMPT) + out["token_ids"]
    assert len(out["logprobs"]) == out["usage"]["total_tokens"] == len(ids)
    assert out["logprobs"][0] is None
    assert out["routing"]["token_ids"] == ids[:-1]  # routing.tokens order, less the last generated token
    # the model's raw distribution (no temperature) at each position, whatever the sampler did
    logp = torch.log_softmax(model.infer(torch.tensor([ids])).logits[0, :-1].double(), -1)
    expected = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert out["logprobs"][1:] == pytest.approx(expected, abs=1e-3)
    # same seed without logprobs: same text (asking for them changes nothing else)
    plain = client.post("/v1/generate", json={**body, "return_logprobs": False}).json()
    assert plain["text"] == out["text"] and plain["logprobs"] is None
    # streamed: each token event carries its logprob, equal to the final list's
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = [lp for e in events if e["type"] == "token" for lp in e["logprobs"]]
    assert streamed == pytest.approx(out["logprobs"][-5:], abs=1e-6)
    assert events[-1]["logprobs"] == pytest.approx(out["logprobs"], abs=1e-6)


def test_routing_reports_each_layers_thresholds(client: httpx.Client, local) -> None:
    model, _ = local
    out = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2, "return_routing": True}).json()
    cuts = out["routing"]["thresholds"]
    assert len(cuts) == model.config.n_layers
    routed = model.config.routing_layers
    assert [layer for layer, c in enumerate(cuts) if c] == list(routed)  # [] where a layer does not route
    assert [cuts[layer][0] for layer in routed] == pytest.approx(model.routing_thresholds())
    # the operator follows the threshold: entropy >= tau -> attention, else DCT
    for ops, ents in zip(out["routing"]["operator"], out["routing"]["entropy"]):
        for layer in routed:
            assert ops[layer] == (Operator.ATTENTION if ents[layer] >= cuts[layer][0] else Operator.DCT)


@pytest.mark.parametrize("stride", [None, 48])
def test_perplexity_token_routing_matches_the_scoring_windows(client: httpx.Client, local, stride: int | None) -> None:
    model, _ = local
    text = (WIKI / "test.txt").read_text(encoding="utf-8")[:600 if stride else 200]
    ids = ids_of(local, text)
    r = client.post("/v1/perplexity", json={"text": text, "return_routing": True, **({"stride": stride} if stride else {})})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    routing = result["token_routing"]
    assert routing["token_ids"] == ids[:-1] and len(routing["operator"]) == len(ids) - 1
    window, step = model.config.max_seq_len, stride or model.config.max_seq_len // 2
    # input position p is routed in the first window [k*step, k*step + window) that holds it
    for p in (0, 1, len(ids) // 2, len(ids) - 2):
        k = max(0, -(-(p + 1 - window) // step))
        begin = k * step
        chunk = torch.tensor([ids[begin: min(begin + window, len(ids) - 1)]])
        assert routing["operator"][p] == model.infer(chunk).routing.operator[0, p - begin].long().tolist()
    # the per-token routing adds up to the per-layer counts
    ops = torch.tensor(routing["operator"])
    assert [[int((ops[:, layer] == op).sum()) for op in range(4)] for layer in range(ops.shape[1])] == result["routing"]["per_layer"]
    assert client.post("/v1/perplexity", json={"text": text}).json()["results"][0]["token_routing"] is None


def test_favicon_is_served(client: httpx.Client) -> None:
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml") and b"<svg" in r.content
