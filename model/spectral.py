"""Orthonormal DCT-II over the hidden axis, spectral entropy (paper eq. 1-2) and DCT mixing (eq. 3).

The DCT runs over the d hidden units of each token, never over the sequence: a sequence-axis DCT
(FNet-style) mixes future tokens into the past and breaks a causal language model.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor, nn


@lru_cache(maxsize=32)
@torch.inference_mode(False)  # a normal tensor even when first asked for under inference_mode: autograd may use it later
def _dct_matrix_cached(d: int, device: str, dtype: torch.dtype) -> Tensor:
    k = torch.arange(d, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(d, dtype=torch.float64).unsqueeze(0)
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * d))
    matrix[0] *= math.sqrt(1.0 / d)
    matrix[1:] *= math.sqrt(2.0 / d)
    return matrix.to(device=device, dtype=dtype)


def dct_matrix(d: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """C[k, i] = s_k cos(pi (2i+1) k / 2d): orthonormal DCT-II, so IDCT = C^T (cached per d/device/dtype)."""
    return _dct_matrix_cached(d, str(torch.device(device)), dtype)


def spectral_dtype(dtype: torch.dtype) -> torch.dtype:
    """Entropy and DCT run in at least fp32 (fp64 stays fp64 for the exactness tests)."""
    return torch.promote_types(dtype, torch.float32)


def dct(x: Tensor) -> Tensor:
    """Orthonormal DCT-II over the last axis (matches scipy.fft.dct(norm="ortho"))."""
    return x @ dct_matrix(x.shape[-1], x.device, x.dtype).T


def idct(c: Tensor) -> Tensor:
    """Inverse of `dct` over the last axis (DCT-III, orthonormal)."""
    return c @ dct_matrix(c.shape[-1], c.device, c.dtype)


def entropy_from_coefficients(coefficients: Tensor, eps: float = 1e-8) -> Tensor:
    """Normalised Shannon entropy of the power spectrum c^2 over the last axis, in [0, 1]."""
    power = coefficients.square() + eps
    p = power / power.sum(dim=-1, keepdim=True)
    return -(p * p.log()).sum(dim=-1) / math.log(coefficients.shape[-1])


def spectral_entropy(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Spectral entropy H (paper eq. 1-2) of each vector along the last axis, computed in >= fp32."""
    return entropy_from_coefficients(dct(x.to(spectral_dtype(x.dtype))), eps)


class DCTMix(nn.Module):
    """y = IDCT(w * DCT(x)) with a learned per-frequency filter w (init 1): per token, so causal."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.filter = nn.Parameter(torch.ones(d_model))
        self._folded: tuple[tuple[object, ...], Tensor, Tensor] | None = None

    def folded(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """(diag(w) C, C^T diag(w) C): the filter folded into the inverse transform, and the whole
        mix as one d x d matrix. Inference only (no autograd); rebuilt when the filter changes
        (in-place update, `load_state_dict`, `.to()`) or another dtype / device asks."""
        # inference tensors (a model built under inference_mode) carry no version counter
        version = None if self.filter.is_inference() else self.filter._version
        key = (version, self.filter.data_ptr(), dtype, torch.device(device))
        if self._folded is None or self._folded[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                c = dct_matrix(self.filter.shape[0], device, dtype)
                synthesis = self.filter.detach().to(dtype).unsqueeze(1) * c
                self._folded = (key, synthesis, c.T @ synthesis)
        return self._folded[1], self._folded[2]

    def infer_from_coefficients(self, coefficients: Tensor, out_dtype: torch.dtype) -> Tensor:
        """`from_coefficients` as one matmul (inference path)."""
        synthesis, _ = self.folded(coefficients.dtype, coefficients.device)
        return (coefficients @ synthesis).to(out_dtype)

    def infer(self, x: Tensor) -> Tensor:
        """`forward` as one matmul (inference path: x @ C^T diag(w) C)."""
        dtype = spectral_dtype(x.dtype)
        _, mix = self.folded(dtype, x.device)
        return (x.to(dtype) @ mix).to(x.dtype)

    def from_coefficients(self, coefficients: Tensor, out_dtype: torch.dtype) -> Tensor:
        """Finish the mix from DCT coefficients already computed for the entropy."""
        return idct(coefficients * self.filter.to(coefficients.dtype)).to(out_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.from_coefficients(dct(x.to(spectral_dtype(x.dtype))), x.dtype)
