"""Random-weight CHIAR and baseline checkpoints of chiar-small's size, for the benchmarks that find no
trained checkpoint (bench.server, bench.server_long, bench.kv_capacity, bench.gpu)."""

from __future__ import annotations

from pathlib import Path

from loadtests.server_process import ROOT

RANDOM_SIZE = dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, d_ff=768, max_seq_len=256)


def random_checkpoints(root: Path, max_seq_len: int = RANDOM_SIZE["max_seq_len"]) -> tuple[Path, Path]:
    """CHIAR + baseline of equal size with random weights and a BPE tokenizer trained on WikiText-2 valid
    (context `max_seq_len`; thresholds at the median entropy of that many tokens of text)."""
    import torch

    from model import ChiarConfig, ChiarLM, save_checkpoint
    from training.calibrate import calibrated_random_model
    from training.tokenizer import train_tokenizer

    text = (ROOT / "data" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    tokenizer = train_tokenizer([text], vocab_size=RANDOM_SIZE["vocab_size"])
    config = ChiarConfig(**{**RANDOM_SIZE, "vocab_size": tokenizer.get_vocab_size(), "max_seq_len": max_seq_len})
    ids = tokenizer.encode(text[: 20 * max_seq_len], add_special_tokens=False).ids[: config.max_seq_len - 1]
    chiar = calibrated_random_model(config, torch.tensor([[config.bos_token_id, *ids]]), seed=0)
    torch.manual_seed(0)
    baseline = ChiarLM(config.replace(arch="baseline")).eval()
    return save_checkpoint(chiar, tokenizer, root / "chiar-random"), save_checkpoint(baseline, tokenizer, root / "baseline-random")
