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

EAGER_POSITIONS = 32768  # rotary table rows built at construction; longer contexts grow it on use
TABLE_CHUNK = 65536  # rows computed at once, so float64 temporaries stay small


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (as in Llama) with cos/sin tables per position, float64 angles rounded once.

    The tables cover min(max_seq_len, EAGER_POSITIONS) positions at first and grow to max_seq_len when
    a forward reaches past them (on CPU to the next power of two that holds the position; elsewhere to
    max_seq_len at once, so no device read is needed), so a long-context config costs memory only
    when long sequences run (a 2^20 context used to allocate 1.8 GB at load)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self._inv_freq64 = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        cos, sin = self._tables(min(max_seq_len, EAGER_POSITIONS), torch.float32, torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin of positions [0, n) as [n, head_dim] in `dtype`: from float64 angles, rounded to float32
        first unless `dtype` is float64 (as the eager tables were before a module cast)."""
        width = 2 * self._inv_freq64.numel()
        # new_empty, not torch.empty: the checkpoint guard builds models under a mode that makes torch.empty a stub
        cos = self._inv_freq64.new_empty((n, width), dtype=dtype, device=device)
        sin = self._inv_freq64.new_empty((n, width), dtype=dtype, device=device)
        exact = dtype == torch.float64
        for start in range(0, n, TABLE_CHUNK):
            angles = torch.outer(torch.arange(start, min(n, start + TABLE_CHUNK), dtype=torch.float64), self._inv_freq64)
            angles = torch.cat([angles, angles], dim=-1)
            for table, values in ((cos, angles.cos()), (sin, angles.sin())):
                table[start:start + angles.shape[0]] = (values if exact else values.float()).to(dtype)
        return cos, sin

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        module = super()._apply(fn, recurse)
        if self.cos.dtype == torch.float64:  # rebuild from fp64 angles instead of upcasting fp32 values
            self.cos, self.sin = self._tables(self.cos.shape[0], torch.float64, self.cos.device)
        return module

    def _grow(self, positions: Tensor) -> None:
        """Extend the tables to cover `positions` (see the class docstring)."""
        if positions.device.type == "cpu":
            if positions.numel() == 0 or int(positions.max()) < self.cos.shape[0]:
                return
            rows = min(self.max_seq_len, 1 << int(positions.max()).bit_length())
        else:
            rows = self.max_seq_len
        self.cos, self.sin = self._tables(rows, self.cos.dtype, self.cos.device)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [..., n, head_dim] with positions broadcastable to [..., n] (heads axis handled by caller)."""
        if self.cos.shape[0] < self.max_seq_len:
            self._grow(positions)
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
