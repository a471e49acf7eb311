"""The batch-shaped inference API of ChiarLM (tests, eval, `generate`): right-padded batches in,
ModelOutput out, each call one `forward_step` over a paged cache."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .inputs import check_inputs, check_tokens
from .kv_cache import BLOCK, DecodeState, PagedKVCache
from .output import ModelOutput, assemble
from .step import TokenBatch

if TYPE_CHECKING:
    from .chiar import ChiarLM


class BatchAPI:
    """infer / prefill / extend / decode_step, mixed into ChiarLM."""

    @torch.no_grad()
    def infer(self: ChiarLM, input_ids: Tensor, attention_mask: Tensor | None = None) -> ModelOutput:
        """Hard-gated inference of a right-padded batch: logits at every position [B, T, V]."""
        output, state = self.prefill(input_ids, attention_mask, all_logits=True)
        state.release()
        return output

    @torch.no_grad()
    def prefill(self: ChiarLM, input_ids: Tensor, attention_mask: Tensor | None = None, all_logits: bool = False,
                skip_logits: bool = False, cache: PagedKVCache | None = None) -> tuple[ModelOutput, DecodeState]:
        """`infer` that keeps each sequence's cache (new rows of `cache`, or of a new cache). Logits at
        each sequence's last token ([B, 1, V]) unless all_logits; none ([B, 0, V]) with skip_logits."""
        valid = check_inputs(self.config, input_ids, attention_mask)
        batch, width = input_ids.shape
        lengths = valid.sum(1).tolist()
        cache = cache if cache is not None else self.new_cache(batch, max(lengths) + BLOCK)
        rows = [cache.allocate() for _ in range(batch)]
        ids = input_ids.tolist()
        ends = list(itertools.accumulate(lengths))
        wanted = [] if skip_logits else None if all_logits else [end - 1 for end in ends]
        step = TokenBatch.build(cache, [(row, ids[b][: lengths[b]]) for b, row in enumerate(rows)], wanted, input_ids.device)
        out = self.forward_step(step, cache)
        heads = [0] * batch if skip_logits else lengths if all_logits else [1] * batch
        shape = "none" if skip_logits else "all" if all_logits else "last"
        return assemble(self, out, lengths, [0] * batch, heads, width, shape), DecodeState(cache, rows)

    @torch.no_grad()
    def extend(self: ChiarLM, tokens: Tensor, state: DecodeState, all_logits: bool = False, skip_logits: bool = False) -> ModelOutput:
        """Continue the one sequence of `state` by the n tokens `tokens` [n] (chunked prefill); equal to
        prefilling the whole sequence at once. Logits [1, n, V] (all_logits), [1, 1, V] or [1, 0, V]."""
        if len(state) != 1:
            raise ValueError(f"state: extend continues one sequence, got {len(state)}")
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens: expected a non-empty 1-D tensor, got shape {tuple(tokens.shape)}")
        check_tokens(self.config, tokens)
        (row,) = state.rows
        n, start = tokens.numel(), state.cache.positions[row]
        if start + n > self.config.max_seq_len:
            raise ValueError(f"tokens: {start} + {n} tokens exceed max_seq_len {self.config.max_seq_len}")
        wanted = [] if skip_logits else None if all_logits else [n - 1]
        out = self.forward_step(TokenBatch.build(state.cache, [(row, tokens.tolist())], wanted, tokens.device), state.cache)
        shape = "none" if skip_logits else "all" if all_logits else "last"
        return assemble(self, out, [n], [start], [0 if skip_logits else n if all_logits else 1], n, shape)

    @torch.no_grad()
    def decode_step(self: ChiarLM, tokens: Tensor, state: DecodeState) -> ModelOutput:
        """One new token per sequence of `state` (tokens [B]); extends the cache in place.
        Returns logits [B, 1, V] and the routing of these tokens."""
        batch = len(state)
        if tokens.shape != (batch,):
            raise ValueError(f"tokens: expected shape ({batch},), got {tuple(tokens.shape)}")
        starts = [state.cache.positions[row] for row in state.rows]
        if max(starts) >= self.config.max_seq_len:
            raise ValueError(f"state: a sequence reached max_seq_len {self.config.max_seq_len}")
        check_tokens(self.config, tokens)
        step = TokenBatch.build(state.cache, [(row, [t]) for row, t in zip(state.rows, tokens.tolist())], None, tokens.device)
        out = self.forward_step(step, state.cache)
        return assemble(self, out, [1] * batch, starts, [1] * batch, 1, "all")
