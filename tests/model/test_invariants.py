"""The invariants docs/ARCHITECTURE.md promises (two forward paths), in float64 over random small configs and every routing mode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from model.generate import generate
from tests.model.helpers import make_model, right_padded_batch, tiny_config

MODES = ["soft", "ste", "threshold", "threshold_reg"]
OPERATOR_SETS = [("dct", "attention"), ("dct", "rbf", "attention")]

configs = st.fixed_dictionaries(
    {
        "routing": st.sampled_from(MODES),
        "operators": st.sampled_from(OPERATOR_SETS),
        "metarouter": st.booleans(),
        "n_layers": st.integers(3, 5),
        "n_heads": st.sampled_from([1, 2, 4]),
        "d_model": st.sampled_from([8, 16, 24]),
        "arch": st.sampled_from(["chiar", "chiar", "chiar", "baseline"]),
    }
)
# seed, example count and deadline come from the hypothesis profile in tests/conftest.py


def _build(params: dict, seed: int):
    if params["d_model"] % (2 * params["n_heads"]):
        params = {**params, "n_heads": 1}
    return make_model(tiny_config(**params), seed=seed)


@given(params=configs, seed=st.integers(0, 1000), cut=st.integers(1, 15))
def test_causality_both_paths(params: dict, seed: int, cut: int) -> None:
    model = _build(params, seed)
    ids, _ = right_padded_batch([16, 16], model.config.vocab_size, seed)
    changed = ids.clone()
    changed[:, cut:] = (changed[:, cut:] + 7) % model.config.vocab_size
    for hard in (None, True, False):
        a, b = model(ids, hard=hard), model(changed, hard=hard)
        torch.testing.assert_close(a.logits[:, :cut], b.logits[:, :cut], rtol=0, atol=1e-10)
        assert torch.equal(a.routing.operator[:, :cut], b.routing.operator[:, :cut])
    a, b = model.infer(ids), model.infer(changed)
    torch.testing.assert_close(a.logits[:, :cut], b.logits[:, :cut], rtol=0, atol=1e-10)
    assert torch.equal(a.routing.operator[:, :cut], b.routing.operator[:, :cut])


@given(params=configs, seed=st.integers(0, 1000), lengths=st.lists(st.integers(1, 14), min_size=1, max_size=4))
def test_infer_equals_hard_reference_with_right_padding(params: dict, seed: int, lengths: list[int]) -> None:
    model = _build(params, seed)
    ids, mask = right_padded_batch(lengths, model.config.vocab_size, seed)
    ref, inf = model(ids, mask, hard=True), model.infer(ids, mask)
    valid = mask.bool()
    assert (ref.logits[valid] - inf.logits[valid]).abs().max().item() <= 1e-6
    assert torch.equal(ref.routing.operator, inf.routing.operator)
    assert bool((inf.routing.operator[~valid] == -1).all())
    assert torch.equal(ref.routing.counts, inf.routing.counts)
    routed = ~torch.isnan(inf.routing.entropy)
    torch.testing.assert_close(inf.routing.entropy[routed], ref.routing.entropy[routed])


@given(params=configs, seed=st.integers(0, 1000), lengths=st.lists(st.integers(1, 10), min_size=1, max_size=3),
       new=st.integers(1, 8))
def test_cached_decode_equals_uncached(params: dict, seed: int, lengths: list[int], new: int) -> None:
    model = _build(params, seed)
    ids, mask = right_padded_batch(lengths, model.config.vocab_size, seed)
    out = generate(model, ids, new, attention_mask=mask)
    for b, length in enumerate(lengths):
        sequence = ids[b, :length].tolist()
        for step, token in enumerate(out.tokens[b]):
            full = model.infer(torch.tensor([sequence]))
            assert int(full.logits[0, -1].argmax()) == token
            if step > 0:  # the cached step's logits match the uncached recomputation
                cached = out.decode_outputs[step - 1]
                row = cached.logits.shape[0] - len(lengths) + b if cached.logits.shape[0] == len(lengths) else b
                torch.testing.assert_close(cached.logits[row, 0], full.logits[0, -1], rtol=0, atol=1e-9)
                assert torch.equal(cached.routing.operator[row, 0], full.routing.operator[0, -1])
            sequence.append(token)


@given(params=configs, seed=st.integers(0, 1000), lengths=st.lists(st.integers(1, 12), min_size=2, max_size=4))
def test_sequence_independent_of_batch_neighbours(params: dict, seed: int, lengths: list[int]) -> None:
    model = _build(params, seed)
    ids, mask = right_padded_batch(lengths, model.config.vocab_size, seed)
    batched_infer = model.infer(ids, mask)
    batched_ref = model(ids, mask)
    batched_gen = generate(model, ids, 5, attention_mask=mask, temperature=0.8, top_k=20, seed=[11 * b for b in range(len(lengths))])
    for b, length in enumerate(lengths):
        alone = ids[b:b + 1, :length]
        torch.testing.assert_close(model.infer(alone).logits[0], batched_infer.logits[b, :length], rtol=0, atol=1e-10)
        torch.testing.assert_close(model(alone).logits[0], batched_ref.logits[b, :length], rtol=0, atol=1e-10)
        solo = generate(model, alone, 5, temperature=0.8, top_k=20, seed=[11 * b])
        assert solo.tokens[0] == batched_gen.tokens[b]


def test_generation_seeds_and_stop_tokens() -> None:
    model = make_model(tiny_config(routing="threshold"), seed=3)
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))
    a = generate(model, ids, 12, temperature=1.0, top_p=0.9, seed=5)
    b = generate(model, ids, 12, temperature=1.0, top_p=0.9, seed=5)
    c = generate(model, ids, 12, temperature=1.0, top_p=0.9, seed=6)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    stop = a.tokens[0][3]
    stopped = generate(model, ids, 12, temperature=1.0, top_p=0.9, seed=5, stop_token_ids=[stop])
    first = a.tokens[0].index(stop)
    assert stopped.tokens[0] == a.tokens[0][: first + 1] and stopped.finish_reasons[0] == "stop"
    assert a.finish_reasons == ["length", "length"] and all(len(t) == 12 for t in a.tokens)


def test_generate_validates_arguments() -> None:
    model = make_model(tiny_config(), seed=0)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, 100)  # beyond max_seq_len 64
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, 2, temperature=1, top_p=1.5)
    with pytest.raises(ValueError, match="attention_mask"):
        model.infer(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="input_ids"):
        model.infer(torch.full((1, 3), 61))


def test_soft_and_ste_gradients_reach_thresholds() -> None:
    for mode, learnable in (("soft", True), ("ste", True), ("threshold", False), ("threshold_reg", False)):
        model = make_model(tiny_config(routing=mode), seed=1).train()
        ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(1))
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        tau = model.blocks[1].router.threshold
        assert tau.requires_grad == learnable
        if learnable:
            assert tau.grad is not None and tau.grad.abs().item() > 0
        if mode == "threshold_reg":  # the penalty's gradient reaches the layers below through the entropy
            assert out.aux_loss.item() > 0
            assert model.blocks[0].ffn.w_in.weight.grad.abs().sum().item() > 0
