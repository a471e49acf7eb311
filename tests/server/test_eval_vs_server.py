"""`python -m training eval` and `/v1/perplexity` score a text the same way (model/scoring.py): same
windows, same NLL sum, same metrics. Only float32 rounding of differently composed batches may differ."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest

from model.scoring import plan_windows
from tests.server.conftest import ServerProcess
from tests.support import WIKI
from training.config import EvalConfig, parse_config
from training.evaluate import run_eval

STRIDE = 48  # the tiny checkpoint's context is 128: a few thousand tokens give dozens of windows


@pytest.mark.parametrize("chars", [300, 12_000])  # one window; many windows
def test_training_eval_and_server_agree(server: ServerProcess, tiny_checkpoint: Path, tmp_path: Path, chars: int) -> None:
    text = (WIKI / "test.txt").read_text(encoding="utf-8")[:chars]
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    cfg = parse_config(EvalConfig, {"checkpoint": str(tiny_checkpoint), "data": [{"name": "doc", "path": str(tmp_path / "doc.txt")}],
                                    "stride": STRIDE, "batch_size": 3, "paths": ["infer"], "device": "cpu"})
    report = run_eval(cfg)
    ours = report["results"]["infer"]["doc"]

    resp = httpx.post(server.url + "/v1/perplexity", json={"text": text, "stride": STRIDE}, timeout=300)
    assert resp.status_code == 200, resp.text
    theirs = resp.json()["results"][0]

    assert report["seq_len"] == resp.json()["window"] and report["stride"] == resp.json()["stride"] == STRIDE
    assert (theirs["tokens"], theirs["words"], theirs["bytes"]) == (ours["tokens"], ours["words"], ours["bytes"])
    assert theirs["windows"] == len(plan_windows(ours["tokens"] + 1, report["seq_len"], STRIDE))
    for server_key, eval_key in [("nll", "nll"), ("perplexity", "token_ppl"), ("word_perplexity", "word_ppl"),
                                 ("bits_per_byte", "bits_per_byte")]:
        assert math.isclose(theirs[server_key], ours[eval_key], rel_tol=1e-5), (server_key, theirs[server_key], ours[eval_key])
