"""What the one inference forward takes and returns (`ChiarLM.forward_step`).

A `TokenBatch` is flat tokens from any number of cache rows: a prompt chunk, a decode token, a
scoring window, side by side (vLLM v1's "scheduled tokens"). Each row's tokens are contiguous and
continue that row where it stands. The forward returns the logits of the positions asked for and
the routing of every token; FLOPs are priced afterwards from the counts (`model.accounting`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .kernels import Kernels
from .kv_cache import PagedKVCache


@dataclass
class TokenBatch:
    tokens: Tensor  # [N] int64
    rows: Tensor  # [N] int64: the cache row each token extends
    positions: Tensor  # [N] int64: its position in its sequence
    spans: list[tuple[int, int]]  # (row, tokens) per contiguous run, in order
    logits_at: Tensor | None  # flat indices whose logits are wanted; None = every token
    fitted: bool = False  # the caller made room in the cache for the batch's worst case already

    @classmethod
    def build(cls, cache: PagedKVCache, parts: Sequence[tuple[int, Sequence[int]]], logits_at: Sequence[int] | None = None,
              device: torch.device | str = "cpu") -> TokenBatch:
        """Tokens `ids` continuing row `row`, for each (row, ids) in `parts` (each row at most once)."""
        tokens: list[int] = []
        rows: list[int] = []
        positions: list[int] = []
        spans = []
        for row, ids in parts:
            start = cache.positions[row]
            tokens += ids
            rows += [row] * len(ids)
            positions += range(start, start + len(ids))
            spans.append((row, len(ids)))
        n = len(tokens)
        wanted = [] if logits_at is None else list(logits_at)
        flat = torch.tensor(tokens + rows + positions + wanted, dtype=torch.long, device=device)  # one allocation, four views
        return cls(flat[:n], flat[n: 2 * n], flat[2 * n: 3 * n], spans, None if logits_at is None else flat[3 * n:])

    def __len__(self) -> int:
        return self.tokens.numel()


@dataclass
class StepContext:
    """What every block of one forward sees besides its input."""

    kernels: Kernels
    cache: PagedKVCache
    rows: Tensor
    positions: Tensor
    gate: Tensor | None  # [N] MetaRouter gate
    operator: Tensor  # [L, N] int8, filled layer by layer
    entropy: Tensor  # [L, N], NaN where a layer computes none
    keys_seen: Tensor  # [L, N] int32: cache entries each token attended (0: it did not attend)
    counts: list[list[int]]  # [L][4] tokens per layer and operator id

    @property
    def n_tokens(self) -> int:
        return self.rows.numel()


@dataclass
class StepOutput:
    logits: Tensor  # [R, V] at TokenBatch.logits_at (all tokens when None)
    operator: Tensor  # [N, L] int8
    entropy: Tensor  # [N, L]
    gate: Tensor | None  # [N]
    counts: list[list[int]]  # [L][4]
    keys_seen: Tensor  # [N, L] int32
    span_counts: np.ndarray  # [S, L, 4] int64: tokens per operator id of each span (TokenBatch.spans)
