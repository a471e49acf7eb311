"""The API's cut points are the model's own (issue 21): what `routing.thresholds` reports per layer is
what that layer's router compares the entropy with, for two- and three-operator models.

Before issue 21 the server re-derived them from the config and reported `[tau]` for a three-operator
model without `bands`, whose routers use the band (tau - 0.05, tau + 0.05).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from model import ChiarConfig, ChiarLM, load_checkpoint, save_checkpoint
from model.routing import UNCALIBRATED_BAND
from tests.support import in_process_app, wait_ready
from training.calibrate import calibrate_evenly

THREE = ["dct", "rbf", "attention"]
NEAR = 1e-5  # tokens this close to a cut point may round either way in float32: not checked


def build(config: ChiarConfig, probe: torch.Tensor, kind: str) -> ChiarLM:
    """A tiny model of `kind`: two operators, three with calibrated bands, or three with thresholds only."""
    torch.manual_seed(0)
    two = calibrate_evenly(ChiarLM(config).eval(), probe)
    if kind == "two":
        return two
    three = config.replace(operators=THREE, thresholds=two.routing_thresholds(), bands=None)
    torch.manual_seed(0)
    model = ChiarLM(three).eval()
    return calibrate_evenly(model, probe) if kind == "three-bands" else model


def served_routing(checkpoint: Path, prompt: str) -> dict:
    from fastapi.testclient import TestClient

    app, _ = in_process_app(checkpoint)
    with TestClient(app) as client:
        wait_ready(client)
        r = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 8, "temperature": 0, "ignore_eos": True,
                                              "return_routing": True})
        assert r.status_code == 200, r.text
        return r.json()["routing"]


@pytest.mark.parametrize("kind", ["two", "three-bands", "three-thresholds"])
def test_reported_cut_points_are_the_ones_the_routers_use(kind: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = ChiarConfig.from_json((tiny_checkpoint / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    prompt = "The history of the city begins with a small settlement on the river, where traders met"
    probe = torch.tensor([[config.bos_token_id, *tokenizer.encode(prompt).ids]])
    model = build(config, probe, kind)
    checkpoint = save_checkpoint(model, tokenizer, tmp_path / kind)
    if kind == "three-thresholds":  # a checkpoint whose config has thresholds only (the writer adds the bands)
        data = json.loads((checkpoint / "config.json").read_text())
        data["bands"] = None
        (checkpoint / "config.json").write_text(json.dumps(data))
    cuts = load_checkpoint(checkpoint)[0].routing_cut_points()
    assert cuts == model.routing_cut_points()
    routed = list(config.routing_layers)
    assert [layer for layer, c in enumerate(cuts) if c] == routed  # [] where a layer does not route
    if kind == "three-thresholds":  # the band the router really uses, not the threshold alone
        taus = model.routing_thresholds()
        for layer, tau in zip(routed, taus):
            assert cuts[layer] == pytest.approx([tau - UNCALIBRATED_BAND, tau + UNCALIBRATED_BAND])

    routing = served_routing(checkpoint, prompt)
    assert routing["thresholds"] == cuts
    labels = routing["operator_names"]
    checked = 0
    for token_ops, token_entropy in zip(routing["operator"], routing["entropy"]):
        for layer in routed:
            op, entropy, layer_cuts = labels[token_ops[layer]], token_entropy[layer], cuts[layer]
            if any(abs(entropy - c) < NEAR for c in layer_cuts):
                continue
            if len(layer_cuts) == 1:  # entropy >= tau -> attention, else DCT
                assert op == ("attention" if entropy >= layer_cuts[0] else "dct"), (layer, entropy, layer_cuts)
            else:  # below p33 DCT, up to p67 RBF, above attention (the learned projection starts at 0)
                want = "dct" if entropy < layer_cuts[0] else "rbf" if entropy < layer_cuts[1] else "attention"
                assert op == want, (layer, entropy, layer_cuts)
            checked += 1
    assert checked >= len(routing["operator"]) * len(routed) // 2
