import math

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import dct, idct, spectral_entropy
from model.spectral import DCTMix, dct_matrix


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 64), batch=st.lists(st.integers(1, 3), min_size=0, max_size=2), seed=st.integers(0, 2**16))
def test_dct_matches_scipy_and_inverts(d: int, batch: list[int], seed: int) -> None:
    x = torch.randn(*batch, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=-1)
    np.testing.assert_allclose(dct(x).numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(idct(dct(x)).numpy(), x.numpy(), atol=1e-12)
    np.testing.assert_allclose(idct(x).numpy(), scipy.fft.idct(x.numpy(), type=2, norm="ortho", axis=-1), atol=1e-12)


def test_dct_matrix_is_orthonormal() -> None:
    c = dct_matrix(48, dtype=torch.float64)
    torch.testing.assert_close(c @ c.T, torch.eye(48, dtype=torch.float64))


@pytest.mark.parametrize("d", [8, 64, 256])
def test_entropy_bounds_single_frequency_and_flat(d: int) -> None:
    single = idct(torch.eye(d, dtype=torch.float64)[3])  # only frequency 3 is non-zero
    assert spectral_entropy(single, eps=0.0).item() == pytest.approx(0.0, abs=1e-9)
    flat = idct(torch.ones(d, dtype=torch.float64))  # equal power in every bin
    assert spectral_entropy(flat, eps=0.0).item() == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_entropy_in_unit_interval_and_scale_invariant(d: int, seed: int) -> None:
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    h = spectral_entropy(x, eps=0.0)
    assert bool(((h >= -1e-12) & (h <= 1 + 1e-12)).all())
    torch.testing.assert_close(spectral_entropy(3.5 * x, eps=0.0), h)


def test_entropy_runs_in_fp32_for_bf16_input() -> None:
    x = torch.randn(4, 32).bfloat16()
    h = spectral_entropy(x)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, spectral_entropy(x.float()))


def test_entropy_matches_definition() -> None:
    x = torch.randn(7, 12, dtype=torch.float64)
    c = scipy.fft.dct(x.numpy(), norm="ortho", axis=-1)
    p = (c**2 + 1e-8) / (c**2 + 1e-8).sum(-1, keepdims=True)
    expected = -(p * np.log(p)).sum(-1) / math.log(12)
    np.testing.assert_allclose(spectral_entropy(x).numpy(), expected, atol=1e-12)


def test_dct_mix_identity_at_init_and_filters_frequencies() -> None:
    mix = DCTMix(16).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(mix(x), x)
    mix.filter.data.zero_()
    mix.filter.data[0] = 1.0  # keep only the DC component: every hidden unit becomes the mean
    torch.testing.assert_close(mix(x), x.mean(-1, keepdim=True).expand_as(x))


def test_folded_dct_mix_follows_the_filter() -> None:
    """The inference path's one-matmul DCT mix (filter folded into the inverse transform) is rebuilt
    when the filter changes, and equals the reference's two-step mix."""
    mix = DCTMix(12).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(mix.infer(x), mix(x), rtol=0, atol=1e-12)
    with torch.no_grad():
        mix.filter.mul_(torch.linspace(0.1, 2.0, 12, dtype=torch.float64))  # in place, as an optimizer step
    torch.testing.assert_close(mix.infer(x), mix(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(mix.infer_from_coefficients(dct(x), x.dtype), mix(x), rtol=0, atol=1e-12)


def test_dct_matrix_first_built_under_inference_mode_serves_autograd() -> None:
    from model import spectral

    spectral._dct_matrix_cached.cache_clear()
    with torch.inference_mode():
        dct(torch.randn(3, 14))
    z = torch.randn(3, 14, requires_grad=True)
    dct(z).square().sum().backward()
    assert z.grad is not None
