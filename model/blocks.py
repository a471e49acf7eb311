"""Blocks: pre-norm residual token mixer + SwiGLU FFN, one class per mixer.

`Block` holds what every layer shares (the two norms, the FFN, the residual wiring) and runs it
once for both paths; a subclass is a token mixer with a reference forward (`mix_reference`: dense,
masks, soft or hard weights, used in training) and an inference forward (`mix_step`: hard
decisions, each operator only on the flat tokens routed to it, through the step's kernels):

- `GatedDCTBlock` (layer 1): DCT mixing where the MetaRouter gate is open, identity elsewhere;
- `RoutedBlock` (layers 2..L-1): the router's `decide(u, entropy)` picks DCT / RBF / attention;
- `AttentionBlock` (layer L, and every baseline layer): full causal attention.

Mixers are subclasses rather than child modules so that parameter names (`blocks.3.attention.qkv`)
and order stay those of existing checkpoints and optimizer states. Each class also states its FLOPs
as a function of the routing result (`mixer_flops`), which `model.accounting` applies after the
forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import flops as fl
from .attention import CausalSelfAttention, RotaryEmbedding
from .config import ChiarConfig
from .layers import RMSNorm, SwiGLU
from .operators import Operator
from .routing import GATE_OPEN, RBFLayer, make_router
from .spectral import DCTMix, dct, entropy_from_coefficients, spectral_dtype
from .step import StepContext

DCT, RBF, ATTENTION, IDENTITY = Operator.DCT, Operator.RBF, Operator.ATTENTION, Operator.IDENTITY


@dataclass
class ReferenceBatch:
    """What every block of one reference forward sees besides its input."""

    positions: Tensor  # [B, T]
    valid: Tensor  # [B, T] bool
    causal_mask: Tensor | None  # [B, 1, T, T] with padding, None = plain causal
    gate: Tensor | None  # [B, T] MetaRouter g
    hard_gate: bool
    hard_route: bool


class Block(nn.Module):
    """norm -> mixer -> residual -> norm -> FFN -> residual. The FFN is shared by every operator."""

    has_attention = False  # holds a KV cache (`attention`)
    routed = False  # has a `router` (and an `rbf`, None without the RBF operator)

    def __init__(self, config: ChiarConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.mixer_norm = RMSNorm(d, config.norm_eps)
        self.ffn_norm = RMSNorm(d, config.norm_eps)
        self.ffn = SwiGLU(d, config.d_ff)
        self.dropout = nn.Dropout(config.dropout)

    def forward_reference(self, x: Tensor, batch: ReferenceBatch) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Returns new x, operator ids [B,T], entropy [B,T] and the threshold_reg penalty (or None)."""
        u = self.mixer_norm(x)
        coefficients = dct(u.to(spectral_dtype(u.dtype)))
        entropy = entropy_from_coefficients(coefficients, self.config.entropy_eps)
        y, operator, penalty = self.mix_reference(u, coefficients, entropy, batch)
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, operator, entropy, penalty

    def forward_step(self, x: Tensor, ctx: StepContext, layer: int) -> Tensor:
        """Hard-gated block on the step's flat tokens x [N, d]; records the routing in `ctx`."""
        x = self.mix_step(ctx.kernels.rms_norm(self.mixer_norm, x), x, ctx, layer)
        return ctx.kernels.ffn(layer, self, x)

    # ------------------------------------------------------------------ the mixer interface
    def mix_reference(
        self, u: Tensor, coefficients: Tensor, entropy: Tensor, batch: ReferenceBatch
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        raise NotImplementedError

    def mix_step(self, u: Tensor, x: Tensor, ctx: StepContext, layer: int) -> Tensor:
        """x + the mixer's output on u = norm(x), each token through the operator it is routed to."""
        raise NotImplementedError

    def mixer_flops(self, n: list[int], pairs: float, gated: bool) -> dict[str, float]:
        """Executed mixer FLOPs for one sequence: n[op] of its tokens took operator op, `pairs` (query,
        key) pairs attended, `gated`: a MetaRouter gate was evaluated."""
        raise NotImplementedError

    def reference_mixer_flops(self, n_tokens: int, pairs: int) -> dict[str, float]:
        """What the dense reference mixer computes (every operator on every token)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ FLOPs of the whole block
    def executed_flops(self, n: list[int], pairs: float, gated: bool) -> dict[str, float]:
        flops = self.mixer_flops(n, pairs, gated)
        flops["ffn"] = fl.ffn_flops(self.config.d_model, self.config.d_ff, sum(n))
        return flops

    def reference_flops(self, n_tokens: int, pairs: int) -> dict[str, float]:
        d = self.config.d_model
        flops = self.reference_mixer_flops(n_tokens, pairs)
        flops["router"] = fl.transform_flops(d, n_tokens) + fl.entropy_flops(d, n_tokens)  # entropy of every layer
        flops["ffn"] = fl.ffn_flops(d, self.config.d_ff, n_tokens)
        return flops


class AttentionBlock(Block):
    """Full causal attention on every token."""

    has_attention = True

    def __init__(self, config: ChiarConfig, rope: RotaryEmbedding) -> None:
        super().__init__(config)
        self.attention = CausalSelfAttention(config.d_model, config.n_heads, rope)

    def mix_reference(
        self, u: Tensor, coefficients: Tensor, entropy: Tensor, batch: ReferenceBatch
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        y = self.attention.forward_dense(u, batch.positions, batch.causal_mask)
        return y, torch.full_like(batch.valid, ATTENTION, dtype=torch.int8), None

    def mix_step(self, u: Tensor, x: Tensor, ctx: StepContext, layer: int) -> Tensor:
        ctx.operator[layer].fill_(ATTENTION)
        ctx.counts[layer][ATTENTION] = ctx.n_tokens
        x, ctx.keys_seen[layer] = ctx.kernels.attention(layer, self.attention, u, x, ctx.rows, ctx.positions, ctx.cache)
        return x

    def mixer_flops(self, n: list[int], pairs: float, gated: bool) -> dict[str, float]:
        return {ATTENTION.label: fl.attention_flops(self.config.d_model, n[ATTENTION], pairs)}

    def reference_mixer_flops(self, n_tokens: int, pairs: int) -> dict[str, float]:
        return {ATTENTION.label: fl.attention_flops(self.config.d_model, n_tokens, pairs)}


class GatedDCTBlock(Block):
    """Layer 1: DCT mixing where the MetaRouter gate is open (always, without a MetaRouter), identity elsewhere."""

    def __init__(self, config: ChiarConfig) -> None:
        super().__init__(config)
        self.dct_mix = DCTMix(config.d_model)

    def mix_reference(
        self, u: Tensor, coefficients: Tensor, entropy: Tensor, batch: ReferenceBatch
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        mixed = self.dct_mix.from_coefficients(coefficients, u.dtype)
        if batch.gate is None:
            return mixed, torch.full_like(batch.valid, DCT, dtype=torch.int8), None
        is_open = batch.gate >= GATE_OPEN
        if batch.hard_gate:
            y = torch.where(is_open.unsqueeze(-1), mixed, u)
        else:
            g = batch.gate.unsqueeze(-1).to(u.dtype)
            y = g * mixed + (1 - g) * u
        return y, torch.where(is_open, int(DCT), int(Operator.IDENTITY)).to(torch.int8), None

    def mix_step(self, u: Tensor, x: Tensor, ctx: StepContext, layer: int) -> Tensor:
        mix = ctx.kernels.gated_mix
        n = ctx.n_tokens
        if ctx.gate is None:
            ctx.operator[layer].fill_(DCT)
            ctx.counts[layer][DCT] = n
            return mix(layer, self, u, x)
        is_open = ctx.gate >= GATE_OPEN
        ctx.operator[layer] = torch.where(is_open, int(DCT), int(IDENTITY))
        sel = is_open.nonzero().squeeze(1)  # the layer's one host read
        ctx.counts[layer][DCT], ctx.counts[layer][IDENTITY] = sel.numel(), n - sel.numel()
        if sel.numel() == n:  # every gate open: no gather or scatter
            return mix(layer, self, u, x)
        y = x + u  # a closed gate passes the token unmixed
        if sel.numel():
            y.index_copy_(0, sel, mix(layer, self, u.index_select(0, sel), x.index_select(0, sel)))
        return y

    def mixer_flops(self, n: list[int], pairs: float, gated: bool) -> dict[str, float]:
        d = self.config.d_model
        flops = {DCT.label: (2 * fl.transform_flops(d, 1) + d) * n[DCT]}
        if gated:
            flops["router"] = 3.0 * d * sum(n)  # running mean + gate dot product
        return flops

    def reference_mixer_flops(self, n_tokens: int, pairs: int) -> dict[str, float]:
        d = self.config.d_model
        return {DCT.label: fl.transform_flops(d, n_tokens) + d * n_tokens}


class RoutedBlock(Block):
    """Layers 2..L-1: each token goes to the operator its router decides (DCT / attention, or DCT / RBF / attention)."""

    has_attention = True
    routed = True

    def __init__(self, config: ChiarConfig, rope: RotaryEmbedding, routing_index: int) -> None:
        super().__init__(config)
        # registration order = parameter order of existing checkpoints and optimizer states
        self.attention = CausalSelfAttention(config.d_model, config.n_heads, rope)
        self.dct_mix = DCTMix(config.d_model)
        self.router = make_router(config, routing_index)
        self.rbf = RBFLayer(config.d_model, config.rbf_centers) if config.three_operators else None

    def _operator(
        self, op: Operator, u: Tensor, x: Tensor, coefficients: Tensor, sel: Tensor | None, ctx: StepContext, layer: int
    ) -> Tensor:
        """x + operator `op` on the flat tokens `sel` (None: all of them); gathers only what `op` reads."""

        def pick(t: Tensor) -> Tensor:
            return t if sel is None else t.index_select(0, sel)

        if op == DCT:  # inverse transform and filter (one matmul): the forward transform is the router's
            return ctx.kernels.dct_mix(layer, self, pick(coefficients), pick(x))
        if op == RBF:
            return ctx.kernels.rbf(layer, self, pick(u), pick(x))
        out, seen = ctx.kernels.attention(layer, self.attention, pick(u), pick(x), pick(ctx.rows), pick(ctx.positions), ctx.cache)
        if sel is None:
            ctx.keys_seen[layer] = seen
        else:
            ctx.keys_seen[layer].index_copy_(0, sel, seen)
        return out

    def mix_reference(
        self, u: Tensor, coefficients: Tensor, entropy: Tensor, batch: ReferenceBatch
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Dense: every operator on every token, blended by the (soft or hard) decision."""
        cfg = self.config
        operators = self.router.operators
        operator = self.router.decide(u, entropy)
        probs = self.router.probabilities(u, entropy)
        if batch.hard_route:
            weights = torch.stack([operator == op for op in operators], -1).to(probs.dtype)
            if cfg.routing == "ste" and torch.is_grad_enabled():
                weights = weights + probs - probs.detach()
            mask = routed_mask((operator == ATTENTION) & batch.valid, batch.valid)
        else:
            weights, mask = probs, batch.causal_mask
        outputs = {
            DCT: lambda: self.dct_mix.from_coefficients(coefficients, u.dtype),
            RBF: lambda: self.rbf(u) if self.rbf is not None else u,
            ATTENTION: lambda: self.attention.forward_dense(u, batch.positions, mask),
        }
        weights = weights.to(u.dtype).unsqueeze(-1)
        y = sum(weights[..., i, :] * outputs[op]() for i, op in enumerate(operators))
        penalty = None
        if cfg.routing == "threshold_reg":
            share = probs[..., operators.index(ATTENTION)]
            penalty = (masked_mean(share, batch.valid) - cfg.target_attention_share).square()
        return y, operator, penalty  # type: ignore[return-value]

    def mix_step(self, u: Tensor, x: Tensor, ctx: StepContext, layer: int) -> Tensor:
        # the layer's one host read: how many tokens took each operator (sizes the work below)
        coefficients, sizes = ctx.kernels.spectral(layer, self, u, ctx.entropy[layer], ctx.operator[layer])
        ctx.counts[layer] = sizes
        n = ctx.n_tokens
        single = next((op for op in self.router.operators if sizes[op] == n), None)
        if single is not None:  # every token took one operator (always so at batch-1 decode): no gather, no scatter
            return self._operator(single, u, x, coefficients, None, ctx, layer)
        # tokens grouped by operator id; stable, so each group keeps flat order (a row's tokens stay in order)
        order = torch.argsort(ctx.operator[layer], stable=True)
        y = torch.empty_like(x)
        start = 0
        for op in Operator:
            if sizes[op]:
                sel = order[start : start + sizes[op]]
                y.index_copy_(0, sel, self._operator(op, u, x, coefficients, sel, ctx, layer))
            start += sizes[op]
        return y

    def mixer_flops(self, n: list[int], pairs: float, gated: bool) -> dict[str, float]:
        cfg = self.config
        d = cfg.d_model
        router = fl.transform_flops(d, 1) + fl.entropy_flops(d, 1) + (6.0 * d if self.rbf is not None else 0.0)
        return {
            "router": router * sum(n),
            DCT.label: (fl.transform_flops(d, 1) + d) * n[DCT],
            RBF.label: fl.rbf_flops(d, cfg.rbf_centers, 1) * n[RBF],
            ATTENTION.label: fl.attention_flops(d, n[ATTENTION], pairs),
        }

    def reference_mixer_flops(self, n_tokens: int, pairs: int) -> dict[str, float]:
        cfg = self.config
        d = cfg.d_model
        flops = {ATTENTION.label: fl.attention_flops(d, n_tokens, pairs), DCT.label: fl.transform_flops(d, n_tokens) + d * n_tokens}
        if self.rbf is not None:
            flops[RBF.label] = fl.rbf_flops(d, cfg.rbf_centers, n_tokens)
        return flops


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    weights = valid.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def routed_mask(to_attention: Tensor, valid: Tensor) -> Tensor:
    """[B,1,T,T]: query i attends key j iff j <= i and j is attention-routed; the diagonal always
    stays open so no row is fully masked (a DCT-routed query's attention output is discarded)."""
    t = to_attention.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=to_attention.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=to_attention.device)
    return ((causal & (to_attention & valid)[:, None, :]) | eye).unsqueeze(1)
