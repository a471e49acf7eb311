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
