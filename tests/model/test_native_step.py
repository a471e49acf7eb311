"""The whole forward in one native call (csrc/step.cpp) against the per-layer native path it replaces.

Both run the same native ops in the same order, so every output and every byte of the cache must be
equal, not close: logits, routing, entropy, gate, attended entries, counts, and the pool, tables,
lengths and running sums after the step. The batches mix prompt chunks, decode tokens and new rows,
with open and closed MetaRouter gates and both operators in the routed layers.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from model import load_checkpoint
from model.kv_cache import PagedKVCache
from model.operators import Operator
from model.step import StepOutput, TokenBatch
from tests.model.helpers import make_model, tiny_config
from tests.support import REPO, WIKI


def fp32_model(seed: int, **config: object) -> torch.nn.Module:
    model = make_model(tiny_config(d_model=32, n_heads=4, d_ff=48, **config), seed=seed).float().eval()
    model.set_kernels("native")
    return model


def per_layer(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose native kernels run the forward layer by layer."""
    other = copy.deepcopy(model)
    other.set_kernels("native")
    other.kernels.whole_step = False
    return other


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def same_step(a: StepOutput, b: StepOutput) -> None:
    for name in ("logits", "operator", "entropy", "gate", "keys_seen"):
        same(getattr(a, name), getattr(b, name))
    assert a.counts == b.counts and np.array_equal(a.span_counts, b.span_counts)


def same_cache(a: PagedKVCache, b: PagedKVCache, rows: int = 3) -> None:
    for name in ("tables", "lengths", "embed_sum", "free_stack", "free_top"):
        same(getattr(a, name), getattr(b, name))
    assert a.positions == b.positions and a.entries == b.entries
    for row in range(rows):  # the entries written (the rest of the pool is uninitialised)
        for layer in a.attention_layers:
            for x, y in zip(a.gather(row, layer, a.entries[row][layer]), b.gather(row, layer, b.entries[row][layer])):
                same(x, y)


def run_steps(model: torch.nn.Module, seqs: list[list[int]]) -> tuple[list[StepOutput], PagedKVCache]:
    """Three forwards: two rows' prompts; a decode token, a chunk and a new row's prompt (logits at
    chosen tokens); then one decode token per row."""
    cache = model.new_cache(rows=3, tokens_per_row=64)
    a, b = cache.allocate(), cache.allocate()
    outs = [model.forward_step(TokenBatch.build(cache, [(a, seqs[0][:20]), (b, seqs[1][:9])]), cache)]
    c = cache.allocate()
    batch = TokenBatch.build(cache, [(a, seqs[0][20:21]), (b, seqs[1][9:16]), (c, seqs[2][:11])], logits_at=[0, 7, 18])
    outs.append(model.forward_step(batch, cache))
    outs.append(model.forward_step(TokenBatch.build(cache, [(a, seqs[0][21:22]), (b, seqs[1][16:17]), (c, seqs[2][11:12])]), cache))
    return outs, cache


@pytest.mark.parametrize("config", [dict(arch="baseline"), dict(routing="threshold", metarouter=True),
                                    dict(routing="threshold", metarouter=False)], ids=["baseline", "chiar", "chiar-no-gate"])
@pytest.mark.parametrize("seed", [0, 5])
def test_the_whole_step_gives_the_per_layer_bits(config: dict, seed: int) -> None:
    model = fp32_model(seed, **config)
    assert model.kernels.step_model() is not None
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (22, 17, 12)]
    fused, fused_cache = run_steps(model, seqs)
    layered, layered_cache = run_steps(per_layer(model), seqs)
    for x, y in zip(fused, layered):
        same_step(x, y)
    same_cache(fused_cache, layered_cache)
    if config.get("arch") != "baseline":  # the batches exercised every branch of the routed layers
        ops = torch.cat([o.operator for o in fused])
        for layer in model.config.routing_layers:
            assert {int(Operator.DCT), int(Operator.ATTENTION)} <= set(ops[:, layer].tolist())
        if config.get("metarouter"):
            assert {int(Operator.DCT), int(Operator.IDENTITY)} <= set(ops[:, 0].tolist())


def test_the_whole_step_gives_the_per_layer_bits_on_the_demo_checkpoint() -> None:
    model, tokenizer = load_checkpoint(REPO / "checkpoints" / "chiar-small")
    model.set_kernels("native")
    words = (WIKI / "test.txt").read_text(encoding="utf-8").split()[:300]
    seqs = [[model.config.bos_token_id, *tokenizer.encode(" ".join(words[i * 60:(i + 1) * 60]), add_special_tokens=False).ids]
            for i in range(3)]
    fused, fused_cache = run_steps(model, seqs)
    layered, layered_cache = run_steps(per_layer(model), seqs)
    for x, y in zip(fused, layered):
        same_step(x, y)
    same_cache(fused_cache, layered_cache)


def test_a_three_operator_model_runs_layer_by_layer() -> None:
    """Its router reads a learned projection of u besides the entropy: the whole step does not cover it."""
    model = fp32_model(1, routing="threshold", operators=("dct", "rbf", "attention"))
    assert model.kernels.step_model() is None
    out = model.forward_step(TokenBatch.build(cache := model.new_cache(rows=1, tokens_per_row=8), [(cache.allocate(), [3, 4, 5])]), cache)
    assert out.logits.shape == (3, model.config.vocab_size)


def test_the_whole_step_follows_in_place_weight_changes() -> None:
    """Outside a server the kernels are not frozen: an edited weight or threshold reaches the next step."""
    model = fp32_model(2, routing="threshold", metarouter=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    before = model.infer(ids).logits
    with torch.no_grad():
        model.blocks[1].ffn.w_out.weight.mul_(3.0)
        model.blocks[0].dct_mix.filter.add_(0.5)
    after = model.infer(ids).logits
    model.kernels.whole_step = False
    assert torch.equal(after, model.infer(ids).logits)
    assert not torch.allclose(before, after)
