"""The native CPU kernels (csrc/, `model.kernels.NativeKernels`).

- against the eager float32 path: logits within float32 tolerance and identical routing, on the
  demo checkpoints over WikiText-2 text (the fixed prompt set) and on tiny calibrated models;
- bitwise properties the eager path does not have: a sequence's logits and routing do not depend on
  its batch neighbours, on how its prompt was chunked, or on decoding token by token (batch-invariant);
- the scalar path gives the AVX2 path's bits; packed weights follow in-place weight changes.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import load_checkpoint, native
from model.kernels import NativeKernels, choose_kernels
from model.kv_cache import DecodeState
from model.spectral import dct_matrix
from model.step import TokenBatch
from tests.model.helpers import make_model, tiny_config
from tests.support import REPO, WIKI

CONFIGS = [
    dict(arch="baseline"),
    dict(routing="threshold", metarouter=True),
    dict(routing="threshold", operators=("dct", "rbf", "attention")),
]


def fp32_model(seed: int, **config: object) -> torch.nn.Module:
    """A calibrated tiny model (thresholds in wide gaps, see helpers) in float32 on the native kernels."""
    model = make_model(tiny_config(d_model=32, n_heads=4, d_ff=48, **config), seed=seed).float().eval()
    model.set_kernels("native")
    return model


def test_the_extension_is_built_and_chosen_for_float32_cpu_models() -> None:
    assert native.load() is not None, native.unavailable_reason()
    model = fp32_model(0)
    assert isinstance(model.kernels, NativeKernels)
    assert choose_kernels(copy.deepcopy(model).double(), "auto").name == "eager"
    with pytest.raises(ValueError, match="float32"):
        choose_kernels(copy.deepcopy(model).double(), "native")


@pytest.fixture(scope="module", params=["chiar-small", "baseline-small"])
def checkpoint(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, torch.Tensor]:
    model, tokenizer = load_checkpoint(REPO / "checkpoints" / request.param)
    words = (WIKI / "test.txt").read_text(encoding="utf-8").split()[:4000]
    texts = [" ".join(words[i * 250:(i + 1) * 250]) for i in range(4)]
    ids = [[model.config.bos_token_id, *tokenizer.encode(t, add_special_tokens=False).ids][:192] for t in texts]
    return model, torch.tensor(ids)


def test_native_matches_eager_on_the_demo_checkpoints(checkpoint: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, ids = checkpoint
    model.set_kernels("eager")
    eager = model.infer(ids)
    model.set_kernels("native")
    fast = model.infer(ids)
    assert torch.equal(fast.routing.operator, eager.routing.operator)  # identical routing on the prompt set
    diff = (fast.logits.log_softmax(-1) - eager.logits.log_softmax(-1)).abs()
    assert float(diff.max()) < 2e-4, float(diff.max())
    assert torch.equal(fast.logits.argmax(-1), eager.logits.argmax(-1))


@pytest.mark.parametrize("config", CONFIGS, ids=["baseline", "chiar", "three-operator"])
def test_native_matches_eager_on_tiny_models(config: dict) -> None:
    model = fp32_model(3, **config)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(3))
    fast = model.infer(ids)
    model.set_kernels("eager")
    eager = model.infer(ids)
    assert torch.equal(fast.routing.operator, eager.routing.operator)
    torch.testing.assert_close(fast.logits, eager.logits, rtol=0, atol=1e-5)


def run_alone(model: torch.nn.Module, ids: list[int], cuts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """All-position logits and routing of one sequence fed alone, in chunks ending at `cuts`."""
    cache = model.new_cache(rows=1, tokens_per_row=len(ids))
    row = cache.allocate()
    logits, operators = [], []
    for lo, hi in itertools.pairwise([0, *cuts, len(ids)]):
        if hi > lo:
            out = model.forward_step(TokenBatch.build(cache, [(row, ids[lo:hi])]), cache)
            logits.append(out.logits)
            operators.append(out.operator)
    return torch.cat(logits), torch.cat(operators)


@settings(max_examples=15, deadline=None)
@given(config=st.sampled_from(CONFIGS), lengths=st.lists(st.integers(1, 30), min_size=2, max_size=4),
       cuts=st.lists(st.integers(1, 29), max_size=3), seed=st.integers(0, 30))
def test_a_sequence_gets_the_same_bits_alone_chunked_or_batched(config: dict, lengths: list[int], cuts: list[int], seed: int) -> None:
    model = fp32_model(seed, **config)
    gen = torch.Generator().manual_seed(seed + 7)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    # all sequences in one forward, prefix of each first, then the rest together with decode-sized pieces
    cache = model.new_cache(rows=len(seqs), tokens_per_row=max(lengths))
    rows = [cache.allocate() for _ in seqs]
    half = [max(1, n // 2) for n in lengths]
    first = model.forward_step(TokenBatch.build(cache, [(r, s[:h]) for r, s, h in zip(rows, seqs, half)]), cache)
    rest_parts = [(r, s[h:]) for r, s, h in zip(rows, seqs, half) if len(s) > h]
    second = model.forward_step(TokenBatch.build(cache, rest_parts), cache) if rest_parts else None
    start1, start2 = 0, 0
    for s, h in zip(seqs, half):
        mine = sorted({c for c in cuts if c < len(s)})
        alone_logits, alone_ops = run_alone(model, s, mine)
        assert torch.equal(first.logits[start1: start1 + h], alone_logits[:h])
        assert torch.equal(first.operator[start1: start1 + h], alone_ops[:h])
        start1 += h
        if len(s) > h:
            assert second is not None
            n = len(s) - h
            assert torch.equal(second.logits[start2: start2 + n], alone_logits[h:])
            assert torch.equal(second.operator[start2: start2 + n], alone_ops[h:])
            start2 += n


def test_decoding_gives_the_bits_of_the_prefill(checkpoint: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, ids = checkpoint
    model.set_kernels("native")
    whole = model.infer(ids[:, :48])
    _, state = model.prefill(ids[:, :32])
    steps = [model.decode_step(ids[:, t], state) for t in range(32, 48)]
    assert torch.equal(torch.cat([s.logits for s in steps], 1), whole.logits[:, 32:48])
    assert torch.equal(torch.cat([s.routing.operator for s in steps], 1), whole.routing.operator[:, 32:48])


def test_the_scalar_path_gives_the_avx2_bits(checkpoint: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, ids = checkpoint
    model.set_kernels("native")
    lib = native.load()
    assert lib is not None
    fast = model.infer(ids[:2, :64])
    lib.set_scalar(True)
    try:
        slow = model.infer(ids[:2, :64])
    finally:
        lib.set_scalar(False)
    assert torch.equal(fast.logits, slow.logits)
    torch.testing.assert_close(fast.routing.entropy, slow.routing.entropy, rtol=0, atol=0, equal_nan=True)


def test_packed_weights_follow_in_place_changes() -> None:
    model = fp32_model(1, routing="threshold", metarouter=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    before = model.infer(ids).logits
    with torch.no_grad():
        model.blocks[1].ffn.w_out.weight.mul_(3.0)  # changed in place after the weights were packed
        model.blocks[1].dct_mix.filter.add_(0.5)
    after = model.infer(ids).logits
    model.set_kernels("eager")
    torch.testing.assert_close(after, model.infer(ids).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(before, after)


def test_demo_weights_pack_in_bf16_exactly_and_others_in_float32(checkpoint: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, _ = checkpoint
    model.set_kernels("native")
    packs = model.kernels.packs
    # the checkpoint stores bf16: every weight matrix packs in bf16; the DCT matrices (cosines) stay float32
    assert packs["lm_head"].bf16 and packs["5.w_in"].bf16
    assert not packs["dct_even"].bf16
    assert 0.9 < packs.bf16_share() < 1.0


def test_freed_rows_return_every_block() -> None:
    model = fp32_model(2, routing="threshold", metarouter=True)
    _, state = model.prefill(torch.randint(0, model.config.vocab_size, (3, 37)))
    cache = state.cache
    assert cache.free_blocks < cache.n_blocks
    for token in range(20):
        model.decode_step(torch.tensor([token] * 3), state)
    DecodeState(cache, state.rows).release()
    assert cache.free_blocks == cache.n_blocks and cache.n_rows_used == 0


def test_the_forward_grows_the_rotary_tables_the_kernels_read() -> None:
    """Tables start at 32768 positions (a long-context config must not pay for them at load); a token
    past them gets its table rows before the native attention reads them."""
    model = make_model(tiny_config(d_model=32, n_heads=4, d_ff=48, max_seq_len=70_000), seed=1).float().eval()
    model.set_kernels("native")
    assert model.rope.cos.shape[0] == 32768
    cache = model.new_cache(rows=1, tokens_per_row=8)
    row = cache.allocate()
    cache.positions[row] = 40_000  # as if 40000 tokens had been seen: only RoPE reads the position
    out = model.forward_step(TokenBatch.build(cache, [(row, [3, 4])]), cache)
    assert model.rope.cos.shape[0] >= 40_002 and torch.isfinite(out.logits).all()
    full = copy.deepcopy(model.rope)
    full.cover(69_999)
    torch.testing.assert_close(model.rope.cos, full.cos[: model.rope.cos.shape[0]], rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(d=st.sampled_from([8, 16, 32, 256]), rows=st.integers(1, 9), seed=st.integers(0, 1000))
def test_the_split_dct_is_the_dct(d: int, rows: int, seed: int) -> None:
    """The kernels' DCT through its even/odd split (two d/2 x d/2 halves) against the dense orthonormal
    DCT-II in float64; the inverse adds the residual and applies the filter."""
    lib = native.load()
    assert lib is not None
    h = d // 2
    c = dct_matrix(d, dtype=torch.float64)
    packs = [lib.pack(m.float().contiguous(), False) for m in (c[0::2, :h], c[1::2, :h], c[0::2, :h].T, c[1::2, :h].T)]
    split = lib.SplitDct(*packs)
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, d, generator=gen)
    coefficients = lib.dct(u, split)
    torch.testing.assert_close(coefficients.double(), u.double() @ c.T, rtol=0, atol=1e-5)
    filt, residual = torch.rand(d, generator=gen) + 0.5, torch.randn(rows, d, generator=gen)
    expected = residual.double() + (coefficients.double() * filt.double()) @ c
    torch.testing.assert_close(lib.idct(coefficients, filt, split, residual).double(), expected, rtol=0, atol=1e-5)
    # each row alone gives the bits it has among the others
    assert torch.equal(lib.dct(u[-1:], split), coefficients[-1:])
