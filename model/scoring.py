"""Perplexity scoring, the one home for `python -m training eval` and the server's /v1/perplexity.

- `plan_windows`: sliding windows over a token sequence (BOS first), each target scored once with the
  longest context its window gives;
- `right_pad`: a right-padded batch (ids, attention mask) of token sequences, the model's one layout;
- `Perplexity`: token PPL, word PPL and bits per byte from a summed NLL (`total_nll`).

Both callers plan with the same function, sum NLL with the same `math.fsum` (order-independent) and
derive the metrics from the same dataclass, so their numbers agree by construction; what can still
differ is float32 rounding of logits in differently composed batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Span:
    """One scoring window over `ids`: inputs ids[begin:end]; input position p predicts ids[p + 1].

    The window scores the targets ids[score_from : end + 1]; earlier positions are context only.
    """

    begin: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def plan_windows(n_ids: int, window: int, stride: int) -> list[Span]:
    """Windows of at most `window` inputs over a sequence of `n_ids` tokens, starting `stride` apart.

    Every target ids[1:] is scored by exactly one window. ids[-1] is only ever a target, so a window
    of `window` inputs yields `window` predictions and a text of n_ids <= window + 1 is one window.
    """
    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride: must be between 1 and the window ({window}), got {stride}")
    last_input = n_ids - 1
    spans: list[Span] = []
    begin, scored = 0, 0  # targets ids[1 : scored + 1] are scored
    while scored < last_input:
        end = min(begin + window, last_input)
        spans.append(Span(begin, end, scored + 1))
        scored = end
        begin += stride  # <= end, since stride <= window: no target is skipped
    return spans


def right_pad(seqs: Sequence[Sequence[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    """(ids [B, T], attention_mask [B, T]) with each sequence left-aligned and `pad` after it."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


def total_nll(logprobs: Iterable[float]) -> float:
    """Summed negative log-likelihood (nats), exact and independent of the order tokens were scored in."""
    return -math.fsum(logprobs)


def _exp(x: float) -> float | None:
    try:
        return math.exp(x)
    except OverflowError:
        return None


@dataclass(frozen=True)
class Perplexity:
    """Token PPL = exp(nll / tokens), word PPL = exp(nll / whitespace words), bits per byte =
    nll / (ln 2 * UTF-8 bytes); None where a denominator is 0 or the value overflows a float."""

    nll: float
    tokens: int
    words: int
    bytes: int

    @classmethod
    def of_text(cls, text: str, nll: float, tokens: int) -> Perplexity:
        return cls(nll, tokens, len(text.split()), len(text.encode("utf-8")))

    @property
    def mean_nll(self) -> float | None:
        return self.nll / self.tokens if self.tokens else None

    @property
    def token_ppl(self) -> float | None:
        return _exp(self.nll / self.tokens) if self.tokens else None

    @property
    def word_ppl(self) -> float | None:
        return _exp(self.nll / self.words) if self.words else None

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else None
