"""RoPE causal multi-head attention: the module and its dense-masked reference forward.

The hard-gated inference path projects Q/K/V only for attention-routed tokens and attends over the
paged routed cache (`model.kernels`): a routed token's key sits in its row's cache in token order,
so "causal over cache slots" is exactly "attend to earlier routed tokens". Keys keep their true
positions for RoPE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    def cover(self, position: int) -> None:
        """Make the tables hold `position`, a host int (the inference forward knows its last position)."""
        if position >= self.cos.shape[0]:
            rows = min(self.max_seq_len, 1 << position.bit_length())
            self.cos, self.sin = self._tables(rows, self.cos.dtype, self.cos.device)

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
