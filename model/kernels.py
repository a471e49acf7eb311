"""The operations of one inference step, in two implementations with one interface.

- `EagerKernels`: PyTorch ops on the model's own modules. Any dtype and device; float64 makes it the
  exactness reference the tests compare against.
- `NativeKernels`: the csrc/ kernels (float32 on CPU) on prepacked weights: a handful of calls per
  layer instead of dozens of aten ops, matrix products at memory speed, and every reduction in one
  fixed order, so a token's result never depends on its batch neighbours or on how its prompt was
  chunked (batch-invariant by construction; the scalar path gives the same bits as the AVX2 one).

Blocks call these methods; `choose_kernels` picks the implementation for a model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import native as native_lib
from .kv_cache import BLOCK, PagedKVCache
from .operators import Operator
from .spectral import dct, dct_matrix, entropy_from_coefficients, spectral_dtype

if TYPE_CHECKING:
    from .attention import CausalSelfAttention
    from .blocks import Block
    from .chiar import ChiarLM
    from .layers import RMSNorm
    from .routing import MetaRouter

KERNEL_CHOICES = ("auto", "native", "eager")
N_OPERATORS = len(Operator)


class EagerKernels:
    """Reference implementation: the model's modules and plain PyTorch ops."""

    name = "eager"

    def refresh(self) -> None:
        pass

    def freeze(self) -> None:
        pass

    def step_model(self) -> None:
        """No whole-forward call: the eager forward runs layer by layer."""
        return None

    def rms_norm(self, norm: RMSNorm, x: Tensor) -> Tensor:
        return norm(x)

    def ffn(self, layer: int, block: Block, x: Tensor) -> Tensor:
        return x + block.ffn(block.ffn_norm(x))

    def spectral(self, layer: int, block: Block, u: Tensor, entropy_out: Tensor, operator_out: Tensor) -> tuple[Tensor, list[int]]:
        """DCT coefficients of u; entropy and the router's decision written into the outputs; tokens per operator id."""
        coefficients = dct(u.to(spectral_dtype(u.dtype)))
        entropy = entropy_from_coefficients(coefficients, block.config.entropy_eps)
        entropy_out.copy_(entropy)
        operator_out.copy_(block.router.decide(u, entropy))
        return coefficients, torch.bincount(operator_out.long(), minlength=N_OPERATORS).tolist()

    def dct_mix(self, layer: int, block: Block, coefficients: Tensor, residual: Tensor) -> Tensor:
        return residual + block.dct_mix.infer_from_coefficients(coefficients, residual.dtype)

    def gated_mix(self, layer: int, block: Block, u: Tensor, residual: Tensor) -> Tensor:
        return residual + block.dct_mix.infer(u)

    def rbf(self, layer: int, block: Block, u: Tensor, residual: Tensor) -> Tensor:
        return residual + block.rbf(u)

    def attention(self, layer: int, attention: CausalSelfAttention, u: Tensor, residual: Tensor, rows: Tensor, positions: Tensor,
                  cache: PagedKVCache) -> tuple[Tensor, Tensor]:
        """residual + attention of the tokens `u` (appended to their rows' caches first); and the entries each attended."""
        n = u.shape[0]
        qkv = attention.qkv(u).view(n, 3, attention.n_heads, attention.head_dim)
        pos = positions.unsqueeze(0)
        q = attention.rope(qkv[:, 0].transpose(0, 1), pos)  # [H, n, hd]
        k = attention.rope(qkv[:, 1].transpose(0, 1), pos)
        slots = append_entries(cache, layer, rows.tolist(), k.transpose(0, 1), qkv[:, 2])
        y = torch.empty_like(q)
        start = 0
        for row, count in _groups(rows.tolist()):
            last = slots[start + count - 1] + 1
            keys, values = cache.gather(row, layer, last)
            mine = torch.tensor(slots[start: start + count], device=u.device)
            mask = torch.arange(last, device=u.device) <= mine.unsqueeze(1)
            y[:, start: start + count] = F.scaled_dot_product_attention(q[:, start: start + count], keys, values, attn_mask=mask)
            start += count
        seen = torch.tensor([s + 1 for s in slots], dtype=torch.int32)
        return residual + attention.out(y.transpose(0, 1).reshape(n, -1)), seen

    def gate(self, metarouter: MetaRouter, x: Tensor, rows: Tensor, positions: Tensor, cache: PagedKVCache) -> Tensor:
        """MetaRouter gate of each token from its row's running embedding sum (advanced in place)."""
        gate = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        start = 0
        for row, count in _groups(rows.tolist()):
            part = x[start: start + count]
            sums = torch.cat([cache.embed_sum[row: row + 1], part]).cumsum(0)[1:]  # (S + x1) + x2 ...: decode's order
            cache.embed_sum[row] = sums[-1]
            mean = sums / (positions[start: start + count] + 1).unsqueeze(-1).to(x.dtype)
            gate[start: start + count] = metarouter.gate_from_mean(mean)
            start += count
        return gate

    def logits(self, model: ChiarLM, x: Tensor) -> Tensor:
        return model.lm_head(model.final_norm(x))

    def running_sums(self, start: Tensor, x: Tensor) -> Tensor:
        """The MetaRouter's running embedding sum after each token of x [n, d], continuing `start` [d], in
        the order `gate` adds them (a cached prefix stores the sum at its end: server/engine/prefix_cache.py)."""
        return torch.cat([start[None], x]).cumsum(0)[1:]


class NativeKernels:
    """The csrc/ kernels on packed weights (float32 CPU models)."""

    name = "native"

    def __init__(self, model: ChiarLM, native: object) -> None:
        self.native = native
        self.model = model
        self.frozen = False
        self.packs = native_lib.PackedWeights(native)  # type: ignore[arg-type]
        d = model.config.d_model
        # one DCT for every layer, through its even/odd split (csrc/kernels.h, SplitDct): two d/2 x d/2 halves
        # of C and their transposes, 512 KB of float32 for d = 256 instead of 1 MB, in L2; the filter is
        # applied to the coefficients, IDCT(w * c), instead of a d x d matrix per layer with it folded in
        h = d // 2
        self.packs.add("dct_even", [], lambda: dct_matrix(d)[0::2, :h])
        self.packs.add("dct_odd", [], lambda: dct_matrix(d)[1::2, :h])
        self.packs.add("idct_even", [], lambda: dct_matrix(d)[0::2, :h].T)
        self.packs.add("idct_odd", [], lambda: dct_matrix(d)[1::2, :h].T)
        self.dct = native.SplitDct(*(self.packs[name] for name in ("dct_even", "dct_odd", "idct_even", "idct_odd")))  # type: ignore[attr-defined]
        for layer, block in enumerate(model.blocks):
            self.packs.add(f"{layer}.w_in", [block.ffn.w_in.weight], lambda b=block: b.ffn.w_in.weight)
            self.packs.add(f"{layer}.w_out", [block.ffn.w_out.weight], lambda b=block: b.ffn.w_out.weight)
            if block.has_attention:
                self.packs.add(f"{layer}.qkv", [block.attention.qkv.weight], lambda b=block: b.attention.qkv.weight)
                self.packs.add(f"{layer}.out", [block.attention.out.weight], lambda b=block: b.attention.out.weight)
            if block.routed and block.rbf is not None:
                self.packs.add(f"{layer}.rbf_centers", [block.rbf.centers], lambda b=block: b.rbf.centers)
                self.packs.add(f"{layer}.rbf_values", [block.rbf.values], lambda b=block: b.rbf.values.T)
            projection = block.router.projection() if block.routed else None
            if projection is not None:
                self.packs.add(f"{layer}.router", [projection.weight], lambda p=projection: p.weight)
        self.packs.add("lm_head", [model.lm_head.weight], lambda: model.lm_head.weight)
        self.whole_step = True  # run a forward in one native call where the model allows it (tests turn it off to compare)
        self._step_model: object | None = None  # False: the model is not covered

    def refresh(self) -> None:
        if not self.frozen:
            self.packs.refresh()
            self._step_model = None  # weights or thresholds may have changed: rebuilt on the next forward

    def freeze(self) -> None:
        """The weights will not change any more (a server): skip the per-forward check for edited weights."""
        self.packs.refresh()
        self._step_model = None
        self.frozen = True

    def step_model(self) -> object | None:
        """The model's weights for the whole forward in one native call (csrc/step.cpp), or None where it
        does not cover the model: a router that reads more than the entropy (three operators)."""
        if not self.whole_step:
            return None
        if self._step_model is None:
            covered = all(not block.routed or block.router.entropy_threshold() is not None for block in self.model.blocks)
            self._step_model = self._build_step_model() if covered else False
        return self._step_model or None

    def _build_step_model(self) -> object:
        model, packs = self.model, self.packs
        step = self.native.StepModel()
        for layer, block in enumerate(model.blocks):
            kind = 1 if block.routed else 2 if block.has_attention else 0
            attends = block.has_attention
            step.add_layer(kind, block.mixer_norm.weight.detach(), block.mixer_norm.eps, block.ffn_norm.weight.detach(),
                           block.ffn_norm.eps, packs[f"{layer}.w_in"], packs[f"{layer}.w_out"],
                           packs[f"{layer}.qkv"] if attends else None, packs[f"{layer}.out"] if attends else None,
                           None if kind == 2 else block.dct_mix.filter.detach(), block.router.entropy_threshold() if block.routed else 0.0)
        gate = model.metarouter
        step.set_head(model.embed.weight.detach(), model.final_norm.weight.detach(), model.final_norm.eps, packs["lm_head"],
                      self.dct, None if gate is None else gate.weight.detach(),
                      0.0 if gate is None else float(gate.bias.detach()), model.config.entropy_eps)
        return step

    def rms_norm(self, norm: RMSNorm, x: Tensor) -> Tensor:
        return self.native.rms_norm(x, norm.weight.detach(), norm.eps)

    def ffn(self, layer: int, block: Block, x: Tensor) -> Tensor:
        norm = block.ffn_norm
        return self.native.ffn(x, norm.weight.detach(), norm.eps, self.packs[f"{layer}.w_in"], self.packs[f"{layer}.w_out"])

    def spectral(self, layer: int, block: Block, u: Tensor, entropy_out: Tensor, operator_out: Tensor) -> tuple[Tensor, list[int]]:
        tau = block.router.entropy_threshold()
        coefficients, counts = self.native.route(u, self.dct, block.config.entropy_eps, math.nan if tau is None else tau,
                                                 entropy_out, operator_out, int(Operator.DCT), int(Operator.ATTENTION), N_OPERATORS)
        if tau is None:  # the decision reads u too (three-operator router): its projection natively
            projection = block.router.projection()
            projected = self.native.linear(u, self.packs[f"{layer}.router"]) + projection.bias.detach()
            operator_out.copy_(block.router.decide(u, entropy_out, projected))
            counts = torch.bincount(operator_out.long(), minlength=N_OPERATORS).tolist()
        return coefficients, counts

    def dct_mix(self, layer: int, block: Block, coefficients: Tensor, residual: Tensor) -> Tensor:
        return self.native.idct(coefficients, block.dct_mix.filter.detach(), self.dct, residual)

    def gated_mix(self, layer: int, block: Block, u: Tensor, residual: Tensor) -> Tensor:
        coefficients = self.native.dct(u, self.dct)
        return self.dct_mix(layer, block, coefficients, residual)

    def rbf(self, layer: int, block: Block, u: Tensor, residual: Tensor) -> Tensor:
        weights = block.rbf.weights(u, self.native.linear(u, self.packs[f"{layer}.rbf_centers"]))
        return self.native.linear(weights, self.packs[f"{layer}.rbf_values"], residual)

    def attention(self, layer: int, attention: CausalSelfAttention, u: Tensor, residual: Tensor, rows: Tensor, positions: Tensor,
                  cache: PagedKVCache) -> tuple[Tensor, Tensor]:
        qkv = self.native.linear(u, self.packs[f"{layer}.qkv"])
        rope = attention.rope
        y, seen = self.native.attend(qkv, rows, positions, layer, cache.keys, cache.values, cache.tables, cache.lengths,
                                     cache.free_stack, cache.free_top, rope.cos, rope.sin)
        return self.native.linear(y, self.packs[f"{layer}.out"], residual), seen

    def gate(self, metarouter: MetaRouter, x: Tensor, rows: Tensor, positions: Tensor, cache: PagedKVCache) -> Tensor:
        return self.native.gate(x, rows, positions, cache.embed_sum, metarouter.weight.detach(), float(metarouter.bias))

    def logits(self, model: ChiarLM, x: Tensor) -> Tensor:
        return self.native.linear(self.rms_norm(model.final_norm, x), self.packs["lm_head"])

    def running_sums(self, start: Tensor, x: Tensor) -> Tensor:
        """As `EagerKernels.running_sums`: the gate kernel adds token by token in float32, and so does
        numpy's accumulate (a sequential scan), so the sums are the kernel's to the bit."""
        sums = np.add.accumulate(torch.cat([start[None], x]).numpy(), axis=0, dtype=np.float32)
        return torch.from_numpy(sums[1:])


Kernels = EagerKernels | NativeKernels


def native_unsupported(model: ChiarLM) -> str | None:
    """Why the native kernels cannot run this model (None: they can)."""
    param = next(model.parameters())
    if param.device.type != "cpu":
        return f"the native kernels run on the CPU; the model is on {param.device}"
    if param.dtype != torch.float32:
        return f"the native kernels compute in float32; the model is {param.dtype}"
    return native_lib.unavailable_reason()


def choose_kernels(model: ChiarLM, choice: str) -> Kernels:
    """`auto`: native where they can run, else eager; `native` raises when they cannot; `eager`."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels: must be one of {KERNEL_CHOICES}, got {choice!r}")
    if choice == "eager":
        return EagerKernels()
    reason = native_unsupported(model)
    if reason is None:
        return NativeKernels(model, native_lib.load())
    if choice == "native":
        raise ValueError(f"kernels: native requested but {reason}")
    return EagerKernels()


# ---------------------------------------------------------------------- eager cache writes
def _groups(rows: list[int]) -> list[tuple[int, int]]:
    """(row, count) of each run of equal consecutive rows."""
    groups: list[tuple[int, int]] = []
    for row in rows:
        if groups and groups[-1][0] == row:
            groups[-1] = (row, groups[-1][1] + 1)
        else:
            groups.append((row, 1))
    return groups


def append_entries(cache: PagedKVCache, layer: int, rows: list[int], keys: Tensor, values: Tensor) -> list[int]:
    """Write each token's key and value ([n, H, hd]) at the next entry of its row in `layer`, taking
    blocks from the free stack as the native kernel does; returns each token's slot."""
    slots, blocks, offsets = [], [], []
    lengths = cache.lengths[:, layer]
    for row in rows:
        slot = int(lengths[row])
        if slot // BLOCK >= cache.max_blocks:
            raise ValueError(f"row {row} is full ({slot} entries)")
        if slot % BLOCK == 0:
            top = cache.free_blocks
            if top == 0:
                raise RuntimeError("KV cache: no free block (reserve them before the step)")
            cache.free_top[0] = top - 1
            cache.tables[row, layer, slot // BLOCK] = cache.free_stack[top - 1]
        lengths[row] = slot + 1
        slots.append(slot)
        blocks.append(int(cache.tables[row, layer, slot // BLOCK]))
        offsets.append(slot % BLOCK)
    index_b = torch.tensor(blocks, device=keys.device)
    index_o = torch.tensor(offsets, device=keys.device)
    cache.keys[index_b, :, index_o] = keys.to(cache.dtype)
    cache.values[index_b, :, index_o] = values.to(cache.dtype)
    return slots
