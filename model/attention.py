"""RoPE causal multi-head attention: dense-masked (reference), gathered (hard-gated) and cached decode.

The gathered path projects Q/K/V only for attention-routed tokens, packs them per sequence in
their original order and runs causal attention on the packed block. Because routed tokens keep
their order, "causal over the packed slots" is exactly "attend to earlier routed tokens", so the
fused `is_causal` kernel is used and no mask is materialised. Keys keep their true positions for
RoPE, also when they sit in the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kv_cache import LayerKV


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (as in Llama) with cos/sin tables for every position up to max_seq_len."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        self._angles64 = angles  # kept to rebuild exact tables when the module moves to float64

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        module = super()._apply(fn, recurse)
        if self.cos.dtype == torch.float64:  # rebuild from fp64 angles instead of upcasting fp32 values
            self.cos = self._angles64.cos().to(self.cos.device)
            self.sin = self._angles64.sin().to(self.sin.device)
        return module

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [..., n, head_dim] with positions broadcastable to [..., n] (heads axis handled by caller)."""
        cos = self.cos[positions].to(x.dtype)
        sin = self.sin[positions].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


@dataclass
class PackedTokens:
    """Where each selected (flat) token sits in the packed [B, M] layout."""

    batch_idx: Tensor  # [n] sequence of each selected token
    slot_idx: Tensor  # [n] its rank among the selected tokens of that sequence
    counts: Tensor  # [B] selected tokens per sequence
    max_count: int

    @staticmethod
    def build(batch_idx: Tensor, batch_size: int) -> PackedTokens:
        """batch_idx must be sorted (tokens in row-major order), as `nonzero` returns them."""
        counts = torch.bincount(batch_idx, minlength=batch_size)
        starts = torch.cumsum(counts, 0) - counts
        slot_idx = torch.arange(batch_idx.numel(), device=batch_idx.device) - starts[batch_idx]
        max_count = int(counts.max()) if batch_idx.numel() else 0
        return PackedTokens(batch_idx, slot_idx, counts, max_count)

    @property
    def dense(self) -> bool:
        """Every sequence has max_count tokens: packing is a reshape (no padding, no routing)."""
        return self.batch_idx.numel() == self.counts.numel() * self.max_count

    def pack(self, values: Tensor) -> Tensor:
        """[n, *rest] -> [B, M, *rest] with zeros in empty slots."""
        if self.dense:
            return values.view(self.counts.numel(), self.max_count, *values.shape[1:])
        packed = values.new_zeros((self.counts.numel(), self.max_count, *values.shape[1:]))
        packed[self.batch_idx, self.slot_idx] = values
        return packed

    def unpack(self, packed: Tensor) -> Tensor:
        if self.dense:
            return packed.reshape(self.batch_idx.numel(), *packed.shape[2:])
        return packed[self.batch_idx, self.slot_idx]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE at each token's true position."""

    def __init__(self, d_model: int, n_heads: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.rope = rope

    def _split_heads(self, qkv: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """qkv [B, n, 3d], positions [B, n] -> roped q, k and v as [B, H, n, hd]."""
        batch, n, _ = qkv.shape
        qkv = qkv.view(batch, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qk = self.rope(qkv[:2], positions.unsqueeze(1))  # q and k in one call; positions broadcast over heads
        return qk[0], qk[1], qkv[2]

    def _merge_heads(self, y: Tensor) -> Tensor:
        batch, _, n, _ = y.shape
        return y.transpose(1, 2).reshape(batch, n, self.n_heads * self.head_dim)

    def forward_dense(self, u: Tensor, positions: Tensor, attn_mask: Tensor | None) -> Tensor:
        """Reference path: all tokens; attn_mask [B,1,T,T] bool (True = may attend) or None = causal."""
        q, k, v = self._split_heads(self.qkv(u), positions)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(self._merge_heads(y))

    def forward_packed(self, u_sel: Tensor, positions_sel: Tensor, packed: PackedTokens) -> tuple[Tensor, LayerKV]:
        """Hard-gated path: u_sel [n, d] are the routed tokens only (row-major); returns [n, d] and their K/V."""
        q, k, v = self._split_heads(packed.pack(self.qkv(u_sel)), packed.pack(positions_sel))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(packed.unpack(self._merge_heads(y))), LayerKV(k, v, packed.counts.clone())

    def forward_extend(self, u_sel: Tensor, positions_sel: Tensor, cache: LayerKV) -> tuple[Tensor, int]:
        """n new tokens of cache row 0 ([n, d], in order): append their K/V, attend causally over
        the cache; returns [n, d] and the row's cache length before."""
        q, k, v = self._split_heads(self.qkv(u_sel).unsqueeze(0), positions_sel.unsqueeze(0))  # [1, H, n, hd]
        start = cache.extend_row(0, k[0], v[0])
        n = u_sel.shape[0]
        span = start + n
        keys, values = cache.keys[:1, :, :span], cache.values[:1, :, :span]
        mask = torch.arange(span, device=u_sel.device) <= (start + torch.arange(n, device=u_sel.device)).unsqueeze(1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.view(1, 1, n, span))
        return self.out(self._merge_heads(y)[0]), start

    def forward_decode(self, u_sel: Tensor, positions_sel: Tensor, seq_idx: Tensor, cache: LayerKV) -> Tensor:
        """One new token for each sequence in seq_idx: append its K/V to the cache (room reserved by
        `DecodeState.reserve_step`), attend over the cache."""
        q, k, v = self._split_heads(self.qkv(u_sel).unsqueeze(1), positions_sel.unsqueeze(1))
        # [n, H, 1, hd] after the split (the "batch" axis is the selected sequences)
        cache.append(seq_idx, k, v, reserved=True)
        lengths = cache.lengths[seq_idx]
        span = int(lengths.max())
        if seq_idx.numel() == cache.lengths.numel():  # every sequence attends: a view, no copy of the cache
            keys, values = cache.keys[:, :, :span], cache.values[:, :, :span]
        else:
            keys, values = cache.keys[seq_idx, :, :span], cache.values[seq_idx, :, :span]
        mask = (torch.arange(span, device=u_sel.device) < lengths.unsqueeze(1)).view(-1, 1, 1, span)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out(self._merge_heads(y)[:, 0])
