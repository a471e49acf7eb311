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


TOP_P_CANDIDATES = 1024  # top-p looks at the most likely tokens first; a full sort only when they hold < p


def _filtered(sub: Tensor, ks: list[int], ps: list[float], uniform: Tensor) -> Tensor:
    """Sample rows of scaled logits `sub` [n, V] under top-k / top-p, without sorting the whole vocabulary
    when the candidates decide it. Returns token ids [n]."""
    vocab = sub.shape[-1]
    wanted = [k for k in ks if k < vocab] + ([TOP_P_CANDIDATES] if any(p < 1.0 for p in ps) else [])
    width = min(vocab, max(wanted))
    values, order = sub.topk(width, dim=-1)  # sorted, descending
    k_t = torch.tensor(ks).unsqueeze(1)
    values = values.masked_fill(torch.arange(width) >= k_t, float("-inf"))
    # top-p over the top-k distribution, or over the full one when there is no top-k
    full = (values - sub.logsumexp(-1, keepdim=True)).exp()
    probs = torch.where(k_t < vocab, values.softmax(-1), full)
    p_t = torch.tensor(ps, dtype=torch.float32).unsqueeze(1)
    # drop a token once the tokens ranked before it already cover p; the first always stays
    drop = (probs.cumsum(-1) - probs) >= p_t
    drop[:, 0] = False
    values = values.masked_fill(drop, float("-inf"))
    mass = full.sum(-1)
    short = [i for i, (k, p) in enumerate(zip(ks, ps)) if width < vocab and k >= vocab and p < 1.0 and float(mass[i]) < p]
    picked = _inverse_cdf(values, uniform)
    tokens = order.gather(1, picked.unsqueeze(1)).squeeze(1)
    if short:  # the candidates hold less than p: sort everything for these rows, in one batch
        tokens[short] = _filtered_full(sub[short], p_t[short], uniform[short])
    return tokens


def _filtered_full(rows: Tensor, p: Tensor, uniform: Tensor) -> Tensor:
    """Top-p by a full sort: rows [n, V], p [n, 1]; token ids [n]."""
    values, order = torch.sort(rows, dim=-1, descending=True)
    probs = values.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= p
    drop[:, 0] = False
    picked = _inverse_cdf(values.masked_fill(drop, float("-inf")), uniform)
    return order.gather(1, picked.unsqueeze(1)).squeeze(1)


def _inverse_cdf(scores: Tensor, uniform: Tensor) -> Tensor:
    """Index per row drawn from softmax(scores) by inverting its CDF at `uniform`."""
    cdf = scores.softmax(-1).cumsum(-1)
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    return picked.clamp(max=scores.shape[-1] - 1)


def sample_tokens(logits: Tensor, temperature: list[float], top_k: list[int | None], top_p: list[float | None],
                  generators: list[torch.Generator | None]) -> tuple[list[int], list[int]]:
    """Next token per row of logits [B, V] and the rows that could not be sampled (their token is -1).

    Temperature 0 is greedy. A sampled row draws one uniform number from its own generator and
    inverts the CDF of its (top-k, top-p filtered) distribution, so a row's token does not depend on
    its batch neighbours. Runs on the CPU in fp32 whatever the model's device."""
    scores = logits.detach().float().cpu()
    ok = torch.isfinite(scores).all(-1)
    tokens = scores.argmax(-1)
    vocab = scores.shape[-1]
    rows = [r for r, t in enumerate(temperature) if t > 0]
    uniform = {r: torch.rand(1, generator=generators[r]) for r in rows}
    plain = [r for r in rows if (top_k[r] is None or not 0 < top_k[r] < vocab) and (top_p[r] is None or top_p[r] >= 1.0)]
    filtered = [r for r in rows if r not in set(plain)]
    if plain:
        sub = scores[plain] / torch.tensor([temperature[r] for r in plain]).unsqueeze(1)
        tokens[plain] = _inverse_cdf(sub, torch.cat([uniform[r] for r in plain]))
        ok[plain] &= torch.isfinite(sub).all(-1)  # a temperature so small that logits / T overflow
    if filtered:
        sub = scores[filtered] / torch.tensor([temperature[r] for r in filtered]).unsqueeze(1)
        ok[filtered] &= torch.isfinite(sub).all(-1)
        ks = [top_k[r] if top_k[r] is not None and 0 < top_k[r] < vocab else vocab for r in filtered]
        ps = [top_p[r] if top_p[r] is not None and top_p[r] < 1.0 else 1.0 for r in filtered]
        tokens[filtered] = _filtered(sub, ks, ps, torch.cat([uniform[r] for r in filtered]))
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
