"""Shared fixtures for the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The suite's models are tiny: one intra-op thread is faster than two fighting over 2 cores with
# the servers and trainers the tests start (they inherit this through the environment).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # after OMP_NUM_THREADS on purpose

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]

# Property tests: "ci" (the default) draws the same examples on every run, so CI cannot pass or
# fail by luck; `make test-random` runs profile "random": a fresh seed (printed on failure) and
# more examples for the tests that do not fix their own count.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=10,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("random", derandomize=False, deadline=None, max_examples=100, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny calibrated CHIAR checkpoint directory (d=32, 4 layers, 2 heads, vocab 384, context 128).

    Tokenizer: byte-level BPE trained on the first 20 KB of WikiText-2 valid. Thresholds: the median
    spectral entropy of each routing layer on WikiText text, so both operators get tokens.
    """
    import torch

    from model import ChiarConfig, ChiarLM, save_checkpoint
    from training.tokenizer import train_tokenizer

    text = (REPO / "data" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:20000]
    tokenizer = train_tokenizer([text], vocab_size=384)
    config = ChiarConfig(vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=4, n_heads=2, d_ff=64, max_seq_len=128)
    torch.manual_seed(0)
    probe = ChiarLM(config).eval()
    ids = torch.tensor([[config.bos_token_id, *tokenizer.encode(text[:4000]).ids[: config.max_seq_len - 1]]])
    entropy = probe.infer(ids).routing.entropy[0, :, 1:-1]
    thresholds = entropy.median(dim=0).values.tolist()
    torch.manual_seed(0)
    model = ChiarLM(config.replace(thresholds=thresholds)).eval()
    path = tmp_path_factory.mktemp("tiny_checkpoint") / "chiar-tiny"
    save_checkpoint(model, tokenizer, path)
    return path
