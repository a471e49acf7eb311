"""Batched next-token sampling with one private RNG per sequence (temperature, top-k, top-p).

A row draws one uniform number from its own generator and inverts the CDF of its filtered
distribution, so its token does not depend on its batch neighbours. The native kernel
(csrc/sampling.cpp) does it for every row in one call: greedy rows take the first maximum, top-k a
partial selection, top-p a mass histogram instead of a sort of the vocabulary. The PyTorch version
below is the fallback where the kernels are not built; both keep the same tokens, the native one
walks the CDF in vocabulary order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native


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


def kept_tokens(scores: Tensor, k: int, p: float) -> Tensor:
    """Boolean mask of the tokens top-k (k < V) then top-p (p < 1) keep in each row of `scores` [n, V]: the
    most probable ones whose mass, renormalised after top-k, first reaches p (a token is dropped once
    the tokens ranked before it hold p)."""
    values, order = torch.sort(scores, dim=-1, descending=True)
    if k < scores.shape[-1]:
        values[:, k:] = float("-inf")
    probs = values.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= p
    drop[:, 0] = False
    drop |= values == float("-inf")
    return torch.zeros_like(drop).scatter_(1, order, ~drop)


def _inverse_cdf(scores: Tensor, uniform: Tensor) -> Tensor:
    """Index per row drawn from softmax(scores) by inverting its CDF, in vocabulary order, at `uniform`."""
    cdf = scores.softmax(-1).cumsum(-1)
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    return picked.clamp(max=scores.shape[-1] - 1)


def sample_tokens(logits: Tensor, temperature: list[float], top_k: list[int | None], top_p: list[float | None],
                  generators: list[torch.Generator | None]) -> tuple[list[int], list[int]]:
    """Next token per row of logits [B, V] and the rows that could not be sampled (their token is -1).

    Temperature 0 is greedy. Runs on the CPU in fp32 whatever the model's device."""
    scores = logits.detach().float().cpu().contiguous()
    lib = native.load()
    if lib is not None:
        vocab = scores.shape[-1]
        uniform = [float(torch.rand(1, generator=g)) if t > 0 else 0.0 for t, g in zip(temperature, generators)]
        ks = [k if k is not None and 0 < k < vocab else 0 for k in top_k]
        ps = [p if p is not None and p < 1.0 else 1.0 for p in top_p]
        tokens = lib.sample(scores, torch.tensor(temperature, dtype=torch.float32), torch.tensor(ks, dtype=torch.long),
                            torch.tensor(ps, dtype=torch.float32), torch.tensor(uniform, dtype=torch.float32)).tolist()
        return tokens, [r for r, t in enumerate(tokens) if t < 0]
    return _sample_tokens_torch(scores, temperature, top_k, top_p, generators)


def _sample_tokens_torch(scores: Tensor, temperature: list[float], top_k: list[int | None], top_p: list[float | None],
                         generators: list[torch.Generator | None]) -> tuple[list[int], list[int]]:
    """The same rule in PyTorch ops (where the native kernels are not built): row by row."""
    vocab = scores.shape[-1]
    ok = torch.isfinite(scores).all(-1)
    tokens = scores.argmax(-1)
    for r, t in enumerate(temperature):
        if t <= 0 or not ok[r]:
            continue
        uniform = torch.rand(1, generator=generators[r])
        row = scores[r: r + 1] / t
        if not torch.isfinite(row).all():  # a temperature so small that logits / T overflow
            ok[r] = False
            continue
        k = top_k[r] if top_k[r] is not None and 0 < top_k[r] < vocab else vocab  # type: ignore[operator]
        p = top_p[r] if top_p[r] is not None and top_p[r] < 1.0 else 1.0  # type: ignore[operator]
        if k < vocab or p < 1.0:
            row = row.masked_fill(~kept_tokens(row, k, p), float("-inf"))
        tokens[r] = _inverse_cdf(row, uniform)[0]
    bad = (~ok).nonzero().squeeze(1).tolist()
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
