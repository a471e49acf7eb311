"""Batched next-token sampling with one private RNG per sequence (temperature, top-k, top-p)."""

from __future__ import annotations

import torch
from torch import Tensor


class SamplingError(ValueError):
    """Rows whose logits or parameters give no distribution (non-finite logits, nothing survives)."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"no valid distribution to sample from for rows {rows}")
        self.rows = rows


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private RNG per request: same seed, same samples, whoever shares the batch."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def sample_tokens(logits: Tensor, temperature: list[float], top_k: list[int | None], top_p: list[float | None],
                  generators: list[torch.Generator | None]) -> tuple[list[int], list[int]]:
    """Next token per row of logits [B, V] and the rows that could not be sampled (their token is -1).

    Temperature 0 is greedy. A sampled row draws one uniform number from its own generator and
    inverts the CDF of its (top-k, top-p filtered) distribution, so a row's token does not depend on
    its batch neighbours. Runs on the CPU in fp32 whatever the model's device."""
    scores = logits.detach().float().cpu()
    finite = torch.isfinite(scores).all(-1)
    tokens = scores.argmax(-1)
    rows = [r for r, t in enumerate(temperature) if t > 0]
    if rows:
        vocab = scores.shape[-1]
        temps = torch.tensor([temperature[r] for r in rows], dtype=torch.float32).unsqueeze(1)
        sub = scores[rows] / temps
        ks = [top_k[r] if top_k[r] is not None and 0 < top_k[r] < vocab else vocab for r in rows]
        ps = [top_p[r] if top_p[r] is not None and top_p[r] < 1.0 else 1.0 for r in rows]
        if any(k < vocab for k in ks) or any(p < 1.0 for p in ps):
            sub, order = torch.sort(sub, dim=-1, descending=True)
            ranks = torch.arange(vocab)
            sub = sub.masked_fill(ranks >= torch.tensor(ks).unsqueeze(1), float("-inf"))
            probs = sub.softmax(-1)
            # drop a token once the tokens ranked before it already cover p; the first always stays
            drop = (probs.cumsum(-1) - probs) >= torch.tensor(ps, dtype=torch.float32).unsqueeze(1)
            drop[:, 0] = False
            sub = sub.masked_fill(drop, float("-inf"))
        else:
            order = None
        probs = sub.softmax(-1)
        cdf = probs.cumsum(-1)
        uniform = torch.cat([torch.rand(1, generator=generators[r]) for r in rows])
        total = cdf[:, -1]
        picked = torch.searchsorted(cdf, (uniform * total).unsqueeze(1)).squeeze(1).clamp(max=vocab - 1)
        if order is not None:
            picked = order.gather(1, picked.unsqueeze(1)).squeeze(1)
        tokens[rows] = picked
        ok = torch.isfinite(total) & (total > 0)
        for i, r in enumerate(rows):
            if not bool(ok[i]):
                finite[r] = False
    bad = (~finite).nonzero().squeeze(1).tolist()
    out = tokens.tolist()
    for r in bad:
        out[r] = -1
    return out, bad


def sample_next(logits: Tensor, temperature: list[float], top_k: list[int | None], top_p: list[float | None],
                generators: list[torch.Generator | None]) -> Tensor:
    """`sample_tokens` as a tensor on logits' device; raises SamplingError if a row cannot be sampled."""
    tokens, bad = sample_tokens(logits, temperature, top_k, top_p, generators)
    if bad:
        raise SamplingError(bad)
    return torch.tensor(tokens, dtype=torch.long, device=logits.device)
