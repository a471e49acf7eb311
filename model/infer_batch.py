"""Flat-token bookkeeping of one inference call: which tokens, where they sit, which cache they extend.

The inference path packs the valid tokens of a batch into a flat [N, d] list; `InferBatch` maps a
selection of those tokens (the ones a router sent to attention) onto the right attention kernel:
packed causal attention for a prefill, `forward_extend` for a chunk of one sequence, and
`forward_decode` for one new token per sequence. No FLOPs are counted here: they follow from the
routing result after the forward (`model.accounting`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import CausalSelfAttention, PackedTokens
from .kv_cache import DecodeState, LayerKV


class InferBatch:
    """One prefill, extend or decode call over flat tokens (batch_idx / positions [N])."""

    def __init__(self, batch_idx: Tensor, positions: Tensor, batch_size: int, n_layers: int,
                 state: DecodeState | None, collect_kv: bool, extend: bool = False) -> None:
        self.batch_idx = batch_idx
        self.positions = positions
        self.batch_size = batch_size
        self.state = state  # decode / extend: the cache to extend
        self.extend = extend  # many new tokens of one sequence (chunked prefill) rather than one per sequence
        self.collect_kv = collect_kv
        self.kv: list[LayerKV | None] = [None] * n_layers
        self.all_tokens = torch.arange(batch_idx.numel(), device=batch_idx.device)  # the selection "every token"

    @property
    def n_tokens(self) -> int:
        return self.all_tokens.numel()

    def attend(self, layer: int, attention: CausalSelfAttention, u_sel: Tensor, sel: Tensor) -> Tensor:
        """Attention for the flat tokens `sel` only (u_sel = their inputs, in order); records their K/V."""
        every = sel is self.all_tokens
        positions = self.positions if every else self.positions[sel]
        if self.state is not None:
            cache = self.state.layers[layer]
            assert cache is not None
            if self.extend:  # chunked prefill: sel indexes new tokens of sequence 0
                return attention.forward_extend(u_sel, positions, cache)[0]
            return attention.forward_decode(u_sel, positions, sel, cache)  # one token per sequence: sel = rows
        packed = PackedTokens.build(self.batch_idx if every else self.batch_idx[sel], self.batch_size)
        out, kv = attention.forward_packed(u_sel, positions, packed)
        if self.collect_kv:
            self.kv[layer] = kv
        return out

    def no_attention(self, layer: int, attention: CausalSelfAttention, like: Tensor) -> None:
        """No token of this layer attended: keep an empty cache entry for prefill."""
        if self.collect_kv and self.state is None:
            h, hd = attention.n_heads, attention.head_dim
            empty = like.new_zeros((self.batch_size, h, 0, hd))
            self.kv[layer] = LayerKV(empty, empty.clone(), torch.zeros(self.batch_size, dtype=torch.long, device=like.device))
