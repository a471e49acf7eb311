import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import ChiarConfig, ChiarLM
from model.accounting import executed_flops, linear_price
from model.generate import generate
from model.kv_cache import DecodeState
from tests.model.helpers import make_model, tiny_config


def test_flops_equal_hand_count() -> None:
    # d=8, d_ff=12, V=32, 3 layers (gate, route, attn), one sequence of 4 tokens, no MetaRouter.
    config = ChiarConfig(vocab_size=32, d_model=8, n_layers=3, n_heads=2, d_ff=12, max_seq_len=16, metarouter=False)
    model = ChiarLM(config).double().eval()
    ids = torch.tensor([[3, 1, 4, 1]])
    model.blocks[1].router.set_cut_points([-1.0])  # every token attends in the routing layer
    out = model.infer(ids)
    d, f, v, n = 8, 12, 32, 4
    pairs = 4 * 5 // 2
    ffn = 6 * d * f * n
    gate = 2 * (2 * d * d * n) + d * n  # DCT + IDCT + filter on every token (no MetaRouter)
    route = (2 * d * d * n + 5 * d * n) + (8 * d * d * n + 4 * d * pairs)  # DCT + entropy, attention on all
    attn = 8 * d * d * n + 4 * d * pairs
    head = 2 * d * v * n
    assert out.flops.executed == gate + route + attn + 3 * ffn + head
    assert out.flops.dense == 3 * (8 * d * d * n + 4 * d * pairs + ffn) + head
    assert out.flops.per_layer[1]["attention"] == 8 * d * d * n + 4 * d * pairs
    model.blocks[1].router.set_cut_points([2.0])  # no token attends: DCT + IDCT + filter instead
    out = model.infer(ids)
    route = (2 * d * d * n + 5 * d * n) + (2 * d * d * n + d * n)
    assert out.flops.executed == gate + route + attn + 3 * ffn + head
    assert out.flops.per_layer[1]["attention"] == 0


def test_executed_flops_fall_with_fewer_attention_tokens() -> None:
    model = make_model(tiny_config(n_layers=5), seed=4)
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(0))
    executed = []
    for tau in (0.0, 0.5, 0.9, 1.1):
        with torch.no_grad():
            for layer in model.config.routing_layers:
                model.blocks[layer].router.set_cut_points([tau])
        out = model.infer(ids)
        executed.append((out.routing.attention_share(model.config.routing_layers), out.flops.executed))
    shares = [s for s, _ in executed]
    assert shares[0] == 1.0 and shares[-1] == 0.0
    assert all(a[1] > b[1] for a, b in itertools.pairwise(executed) if a[0] > b[0])
    assert executed[-1][1] < executed[0][1]


def test_decode_flops_count_cache_reads() -> None:
    model = make_model(tiny_config(arch="baseline", n_layers=3), seed=0)
    out = generate(model, torch.randint(0, 61, (1, 5)), 3)
    d, f = 16, 24
    # decode steps at positions 5 and 6 attend over 6 and 7 keys in each of 3 layers
    expected = sum(3 * (8 * d * d + 4 * d * keys + 6 * d * f) for keys in (6, 7)) + 2 * (2 * d * 61)
    assert out.decode_flops.executed == expected == out.decode_flops.dense


def test_parameter_parity() -> None:
    for three in (False, True):
        for metarouter in (False, True):
            ops = ("dct", "rbf", "attention") if three else ("dct", "attention")
            chiar = ChiarLM(tiny_config(metarouter=metarouter, operators=ops))
            baseline = ChiarLM(tiny_config(arch="baseline"))
            d, layers, k = 16, 4, chiar.config.rbf_centers
            routing_layers = layers - 2
            per_router = 2 + (3 * d + 3 + 2 * k * d + k if three else 0)  # tau (or band) + temperature (+ 3-way proj, RBF)
            if three:
                per_router = 3 * d + 3 + 2 + 1 + (2 * k * d + k)  # proj + band(2) + temperature + RBF
            extras = d + (d + 1 if metarouter else 0) + routing_layers * (d + per_router)
            assert chiar.num_parameters() == baseline.num_parameters() - 4 * d * d + extras


def test_kv_cache_holds_only_routed_tokens() -> None:
    model = make_model(tiny_config(n_layers=4), seed=5)
    ids = torch.randint(0, 61, (1, 30), generator=torch.Generator().manual_seed(5))
    out, state = model.prefill(ids)
    counts = out.routing.counts
    entries = state.cache.lengths[state.rows[0]].tolist()
    assert entries[0] == 0  # L1 has no attention, so no cache
    for layer in (1, 2):
        assert entries[layer] == int(counts[layer, 3])
    assert entries[3] == 30
    baseline = make_model(tiny_config(arch="baseline"), seed=5)
    _, base_state = baseline.prefill(ids)
    assert int(state.kv_cache_bytes()[0]) < int(base_state.kv_cache_bytes()[0])


def test_sequences_of_one_cache_decode_together_and_apart() -> None:
    model = make_model(tiny_config(), seed=6)
    a_ids = torch.randint(0, 61, (1, 7))
    b_ids = torch.randint(0, 61, (1, 12))
    _, a_state = model.prefill(a_ids)
    out_b, b_state = model.prefill(b_ids, cache=a_state.cache)  # a second row of the same cache
    joined = DecodeState(a_state.cache, a_state.rows + b_state.rows)
    tokens = torch.tensor([5, int(out_b.logits[0, -1].argmax())])
    step = model.decode_step(tokens, joined)
    _, b_alone = model.prefill(b_ids)
    alone = model.decode_step(tokens[1:], b_alone)
    torch.testing.assert_close(step.logits[1], alone.logits[0], rtol=0, atol=1e-10)
    kept = joined.select([1])
    again = model.decode_step(torch.tensor([3]), kept)
    ref = model.infer(torch.cat([b_ids, tokens[1:].view(1, 1), torch.tensor([[3]])], 1))
    torch.testing.assert_close(again.logits[0, 0], ref.logits[0, -1], rtol=0, atol=1e-10)


def test_per_sequence_flops_sum_to_total_and_ignore_batch_neighbours() -> None:
    model = make_model(tiny_config(n_layers=5), seed=8)
    lengths = [9, 4, 13]
    width = max(lengths)
    ids = torch.randint(0, 61, (3, width), generator=torch.Generator().manual_seed(8))
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    for all_logits in (True, False):
        out, state = model.prefill(ids * mask, mask, all_logits=all_logits)
        assert sum(out.flops.per_sequence_executed) == out.flops.executed
        assert sum(out.flops.per_sequence_dense) == out.flops.dense
        step = model.decode_step(torch.tensor([1, 2, 3]), state)
        assert abs(sum(step.flops.per_sequence_executed) - step.flops.executed) < 1e-6 * step.flops.executed
        assert abs(sum(step.flops.per_sequence_dense) - step.flops.dense) < 1e-6 * step.flops.dense
        for b, length in enumerate(lengths):
            alone, alone_state = model.prefill(ids[b:b + 1, :length], all_logits=all_logits)
            assert alone.flops.per_sequence_executed == [out.flops.per_sequence_executed[b]] == [alone.flops.executed]
            assert alone.flops.per_sequence_dense == [out.flops.per_sequence_dense[b]] == [alone.flops.dense]
            alone_step = model.decode_step(torch.tensor([b + 1]), alone_state)
            assert alone_step.flops.per_sequence_executed == [step.flops.per_sequence_executed[b]]
            assert alone_step.flops.per_sequence_dense == [step.flops.per_sequence_dense[b]]


@settings(max_examples=30, deadline=None)
@given(arch=st.sampled_from(["chiar", "baseline"]), metarouter=st.booleans(), three=st.booleans(),
       counts=st.lists(st.integers(0, 10_000), min_size=4 * 4, max_size=4 * 4),
       pairs=st.lists(st.floats(0, 1e7), min_size=4, max_size=4))
def test_the_linear_price_is_the_per_layer_price(arch: str, metarouter: bool, three: bool, counts: list[int], pairs: list[float]) -> None:
    """The engine prices every step with one dot product; it must be `executed_flops` to rounding."""
    operators = ("dct", "rbf", "attention") if three else ("dct", "attention")
    model = ChiarLM(tiny_config(arch=arch, metarouter=metarouter, operators=operators))
    table = np.array(counts).reshape(4, 4)
    _, (expected,) = executed_flops(model.blocks, [table.tolist()], [pairs], model.metarouter is not None)
    assert linear_price(model)(table, np.array(pairs)) == pytest.approx(expected, rel=1e-12, abs=1e-6)
