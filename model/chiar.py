"""ChiarLM: the CHIAR-Former language model (and its full-attention baseline).

Two forward paths over one set of weights:
- `forward` (reference, training): dense compute with masks; soft or hard routing per mode.
- `infer` / `prefill` / `decode_step` (inference): hard gating with real savings. Tokens are
  packed into a flat [N, d] list of valid tokens, so per-token work never touches padding; each
  operator runs only on the tokens routed to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import flops as fl
from .attention import CausalSelfAttention, PackedTokens, RotaryEmbedding
from .config import ChiarConfig
from .kv_cache import DecodeState, LayerKV
from .routing import MetaRouter, RBFLayer, SpectralRouter, ThreeWayRouter, make_router
from .spectral import DCTMix, dct, entropy_from_coefficients, spectral_dtype

OPERATOR_NAMES = ("identity", "dct", "rbf", "attention")
PAD, IDENTITY, DCT, RBF, ATTENTION = -1, 0, 1, 2, 3
_THREE_WAY_IDS = (DCT, RBF, ATTENTION)  # operator id of each three-way router logit


@dataclass
class RoutingInfo:
    """Per token and layer: operator id (-1 pad, 0 identity, 1 dct, 2 rbf, 3 attention) and entropy."""

    operator: Tensor  # [B, T, L] int8
    entropy: Tensor  # [B, T, L], NaN where not computed
    gate: Tensor  # [B, T] MetaRouter g, NaN where absent
    counts: Tensor  # [L, 4] valid tokens per (layer, operator)

    def attention_share(self, layers: slice | None = None) -> float:
        """Fraction of valid tokens routed to attention over the given layers (default: all)."""
        counts = self.counts[layers] if layers is not None else self.counts
        total = int(counts.sum())
        return float(counts[:, ATTENTION].sum()) / total if total else 0.0


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]
    routing: RoutingInfo
    flops: fl.FlopCount
    loss: Tensor | None = None
    aux_loss: Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.to(spectral_dtype(x.dtype))
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class _InferContext:
    """Flat-token bookkeeping for one inference call (prefill or a decode step)."""

    def __init__(self, batch_idx: Tensor, positions: Tensor, batch_size: int, n_layers: int,
                 state: DecodeState | None, collect_kv: bool, extend: bool = False) -> None:
        self.batch_idx = batch_idx
        self.positions = positions
        self.batch_size = batch_size
        self.state = state  # decode / extend: the cache to extend
        self.extend = extend  # many new tokens of one sequence (chunked prefill) rather than one per sequence
        self.collect_kv = collect_kv
        self.kv: list[LayerKV | None] = [None] * n_layers
        self.flops = fl.FlopCount.empty(n_layers)
        self.tokens_per_seq = torch.bincount(batch_idx, minlength=batch_size).double()
        self.seq_executed = torch.zeros(batch_size, dtype=torch.float64, device=batch_idx.device)

    def charge(self, layer: int, operator: str, per_token: float, sel: Tensor | None = None) -> None:
        """Book per_token FLOPs for each flat token in sel (all tokens when None), in total and per sequence."""
        counts = self.tokens_per_seq if sel is None else torch.bincount(self.batch_idx[sel], minlength=self.batch_size).double()
        self.seq_executed += per_token * counts
        self.flops.add(layer, operator, per_token * float(counts.sum()))

    def attend(self, layer: int, attention: CausalSelfAttention, u_sel: Tensor, sel: Tensor) -> Tensor:
        """Attention for the flat tokens `sel` only; records K/V and the FLOPs actually spent."""
        d = u_sel.shape[-1]
        if self.extend:  # chunked prefill: sel indexes new tokens of sequence 0
            assert self.state is not None
            cache = self.state.layers[layer]
            assert cache is not None
            out, start = attention.forward_extend(u_sel, self.positions[sel], cache)
            m = float(sel.numel())
            counts = torch.full((1,), m, dtype=torch.float64, device=sel.device)
            pairs = torch.full((1,), m * start + m * (m + 1) / 2, dtype=torch.float64, device=sel.device)
        elif self.state is not None:  # decode: one token per sequence, sel indexes sequences
            cache = self.state.layers[layer]
            assert cache is not None
            out = attention.forward_decode(u_sel, self.positions[sel], sel, cache)
            counts = torch.zeros(self.batch_size, dtype=torch.float64, device=sel.device)
            counts[sel] = 1.0
            pairs = torch.zeros_like(counts)
            pairs[sel] = cache.lengths[sel].double()
        else:
            packed = PackedTokens.build(self.batch_idx[sel], self.batch_size)
            out, kv = attention.forward_packed(u_sel, self.positions[sel], packed)
            if self.collect_kv:
                self.kv[layer] = kv
            counts = packed.counts.double()
            pairs = counts * (counts + 1) / 2
        per_seq = fl.attention_flops(d, 1, 0) * counts + fl.attention_flops(d, 0, 1) * pairs
        self.seq_executed += per_seq
        self.flops.add(layer, "attention", float(per_seq.sum()))
        return out

    def no_attention(self, layer: int, attention: CausalSelfAttention, like: Tensor) -> None:
        """No token of this layer attended: keep an empty cache entry for prefill."""
        if self.collect_kv and self.state is None:
            h, hd = attention.n_heads, attention.head_dim
            empty = like.new_zeros((self.batch_size, h, 0, hd))
            self.kv[layer] = LayerKV(empty, empty.clone(), torch.zeros(self.batch_size, dtype=torch.long, device=like.device))


class Block(nn.Module):
    """Pre-norm residual block; `kind` is "gate" (L1), "route" (L2..L-1) or "attn" (full attention).

    The block's FFN is shared by whatever token mixer the block's tokens take.
    """

    def __init__(self, config: ChiarConfig, kind: str, rope: RotaryEmbedding, routing_index: int = -1) -> None:
        super().__init__()
        self.kind = kind
        self.config = config
        d = config.d_model
        self.mixer_norm = RMSNorm(d, config.norm_eps)
        self.ffn_norm = RMSNorm(d, config.norm_eps)
        self.ffn = SwiGLU(d, config.d_ff)
        self.dropout = nn.Dropout(config.dropout)
        if kind in ("attn", "route"):
            self.attention = CausalSelfAttention(d, config.n_heads, rope)
        if kind in ("gate", "route"):
            self.dct_mix = DCTMix(d)
        if kind == "route":
            self.router = make_router(config, routing_index)
            if config.three_operators:
                self.rbf = RBFLayer(d, config.rbf_centers)

    # ------------------------------------------------------------------ reference path
    def forward_reference(self, x: Tensor, positions: Tensor, valid: Tensor, causal_mask: Tensor | None,
                          gate: Tensor | None, hard_gate: bool, hard_route: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Returns new x, operator ids [B,T], entropy [B,T] and the threshold_reg penalty (or None)."""
        cfg = self.config
        u = self.mixer_norm(x)
        coefficients = dct(u.to(spectral_dtype(u.dtype)))
        entropy = entropy_from_coefficients(coefficients, cfg.entropy_eps)
        penalty = None
        if self.kind == "attn":
            y = self.attention.forward_dense(u, positions, causal_mask)
            operator = torch.full_like(valid, ATTENTION, dtype=torch.int8)
        elif self.kind == "gate":
            mixed = self.dct_mix.from_coefficients(coefficients, u.dtype)
            if gate is None:
                y, operator = mixed, torch.full_like(valid, DCT, dtype=torch.int8)
            else:
                is_open = gate >= 0.5
                if hard_gate:
                    y = torch.where(is_open.unsqueeze(-1), mixed, u)
                else:
                    g = gate.unsqueeze(-1).to(u.dtype)
                    y = g * mixed + (1 - g) * u
                operator = torch.where(is_open, DCT, IDENTITY).to(torch.int8)
        else:
            y, operator, share = self._route_reference(u, coefficients, entropy, positions, valid, causal_mask, hard_route)
            if cfg.routing == "threshold_reg":
                penalty = (_masked_mean(share, valid) - cfg.target_attention_share).square()
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, operator, entropy, penalty

    def _route_reference(self, u: Tensor, coefficients: Tensor, entropy: Tensor, positions: Tensor, valid: Tensor,
                         causal_mask: Tensor | None, hard_route: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Dense routing layer: every operator on every token, blended by the (soft or hard) decision."""
        cfg = self.config
        dct_out = self.dct_mix.from_coefficients(coefficients, u.dtype)
        ste = cfg.routing == "ste" and torch.is_grad_enabled()
        if isinstance(self.router, ThreeWayRouter):
            logits = self.router.logits(u, entropy)
            probs = logits.softmax(-1)
            choice = logits.argmax(-1)
            to_attention = (choice == 2) & valid
            ops = torch.tensor(_THREE_WAY_IDS, dtype=torch.int8, device=u.device)
            operator = ops[choice]
            share = probs[..., 2]
            if hard_route:
                weights = F.one_hot(choice, 3).to(probs.dtype)
                if ste:
                    weights = weights + probs - probs.detach()
            else:
                weights = probs
            attn_out = self.attention.forward_dense(u, positions, _routed_mask(to_attention, valid) if hard_route else causal_mask)
            weights = weights.to(u.dtype).unsqueeze(-1)
            y = weights[..., 0, :] * dct_out + weights[..., 1, :] * self.rbf(u) + weights[..., 2, :] * attn_out
            return y, operator, share
        assert isinstance(self.router, SpectralRouter)
        share = self.router.soft_share(entropy)
        to_attention = self.router.hard_attention(entropy) & valid
        operator = torch.where(self.router.hard_attention(entropy), ATTENTION, DCT).to(torch.int8)
        if hard_route:
            attn_out = self.attention.forward_dense(u, positions, _routed_mask(to_attention, valid))
            weight = to_attention.to(share.dtype)
            if ste:
                weight = weight + share - share.detach()
        else:
            attn_out = self.attention.forward_dense(u, positions, causal_mask)
            weight = share
        weight = weight.to(u.dtype).unsqueeze(-1)
        return weight * attn_out + (1 - weight) * dct_out, operator, share

    def reference_flops(self, flops: fl.FlopCount, layer: int, n_tokens: int, pairs: int) -> None:
        """What the dense reference computes on the valid tokens (every operator on every token)."""
        cfg = self.config
        d = cfg.d_model
        flops.add(layer, "router", fl.transform_flops(d, n_tokens) + fl.entropy_flops(d, n_tokens))
        if self.kind in ("attn", "route"):
            flops.add(layer, "attention", fl.attention_flops(d, n_tokens, pairs))
        if self.kind in ("gate", "route"):
            flops.add(layer, "dct", fl.transform_flops(d, n_tokens) + d * n_tokens)
        if self.kind == "route" and cfg.three_operators:
            flops.add(layer, "rbf", fl.rbf_flops(d, cfg.rbf_centers, n_tokens))
        flops.add(layer, "ffn", fl.ffn_flops(d, cfg.d_ff, n_tokens))

    # ------------------------------------------------------------------ inference path
    def forward_infer(self, x: Tensor, gate: Tensor | None, layer: int, ctx: _InferContext) -> tuple[Tensor, Tensor, Tensor]:
        """Hard-gated block on flat tokens x [N, d]; returns new x, operator ids [N], entropy [N]."""
        cfg = self.config
        d = cfg.d_model
        n = x.shape[0]
        u = self.mixer_norm(x)
        entropy = torch.full((n,), float("nan"), dtype=spectral_dtype(u.dtype), device=u.device)
        if self.kind == "attn":
            y = ctx.attend(layer, self.attention, u, torch.arange(n, device=u.device))
            operator = torch.full((n,), ATTENTION, dtype=torch.int8, device=u.device)
        elif self.kind == "gate":
            y = u.clone()
            if gate is None:
                is_open = torch.ones(n, dtype=torch.bool, device=u.device)
            else:
                is_open = gate >= 0.5
                ctx.charge(layer, "router", 3.0 * d)  # running mean + gate dot product
            sel = is_open.nonzero().squeeze(1)
            if sel.numel():  # the DCT runs only where the gate is open
                y[sel] = self.dct_mix(u[sel])
                ctx.charge(layer, "dct", 2 * fl.transform_flops(d, 1) + d, sel)
            operator = torch.where(is_open, DCT, IDENTITY).to(torch.int8)
        else:
            coefficients = dct(u.to(spectral_dtype(u.dtype)))
            entropy = entropy_from_coefficients(coefficients, cfg.entropy_eps)
            ctx.charge(layer, "router", fl.transform_flops(d, 1) + fl.entropy_flops(d, 1))
            if isinstance(self.router, ThreeWayRouter):
                choice = self.router.logits(u, entropy).argmax(-1)
                ctx.charge(layer, "router", 6.0 * d)
                operator = torch.tensor(_THREE_WAY_IDS, dtype=torch.int8, device=u.device)[choice]
            else:
                operator = torch.where(self.router.hard_attention(entropy), ATTENTION, DCT).to(torch.int8)
            y = torch.empty_like(u)
            dct_sel = (operator == DCT).nonzero().squeeze(1)
            if dct_sel.numel():  # inverse transform and filter only for DCT-routed tokens
                y[dct_sel] = self.dct_mix.from_coefficients(coefficients[dct_sel], u.dtype)
                ctx.charge(layer, "dct", fl.transform_flops(d, 1) + d, dct_sel)
            rbf_sel = (operator == RBF).nonzero().squeeze(1)
            if rbf_sel.numel():
                y[rbf_sel] = self.rbf(u[rbf_sel])
                ctx.charge(layer, "rbf", fl.rbf_flops(d, cfg.rbf_centers, 1), rbf_sel)
            attn_sel = (operator == ATTENTION).nonzero().squeeze(1)
            if attn_sel.numel():
                y[attn_sel] = ctx.attend(layer, self.attention, u[attn_sel], attn_sel)
            else:
                ctx.no_attention(layer, self.attention, u)
        x = x + y
        x = x + self.ffn(self.ffn_norm(x))
        ctx.charge(layer, "ffn", fl.ffn_flops(d, cfg.d_ff, 1))
        return x, operator, entropy


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    weights = valid.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def _routed_mask(to_attention: Tensor, valid: Tensor) -> Tensor:
    """[B,1,T,T]: query i attends key j iff j <= i and j is attention-routed; the diagonal always
    stays open so no row is fully masked (a DCT-routed query's attention output is discarded)."""
    t = to_attention.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=to_attention.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=to_attention.device)
    return ((causal & (to_attention & valid)[:, None, :]) | eye).unsqueeze(1)


class ChiarLM(nn.Module):
    """CHIAR-Former (arch="chiar") or its full-attention baseline (arch="baseline")."""

    def __init__(self, config: ChiarConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        if config.arch == "chiar":
            kinds = ["gate"] + ["route"] * config.n_routing_layers + ["attn"]
        else:
            kinds = ["attn"] * config.n_layers
        self.blocks = nn.ModuleList(
            Block(config, kind, self.rope, routing_index=i - 1 if kind == "route" else -1) for i, kind in enumerate(kinds)
        )
        self.metarouter = MetaRouter(d, config.metarouter_bias_init) if config.arch == "chiar" and config.metarouter else None
        self.final_norm = RMSNorm(d, config.norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        residual_std = 0.02 / (2 * self.config.n_layers) ** 0.5
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("router.proj"):
                std = residual_std if name.endswith(("attention.out", "ffn.w_out")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ helpers
    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def routing_thresholds(self) -> list[float]:
        """Current per-routing-layer thresholds (learnable in soft/ste mode)."""
        taus = []
        for block in self.blocks:
            if block.kind == "route":
                router = block.router
                if isinstance(router, SpectralRouter):
                    taus.append(float(router.threshold.detach()))
                else:
                    taus.append(float(router.band.detach().mean()))
        return taus

    def routing_bands(self) -> list[list[float]] | None:
        bands = [block.router.band.detach().tolist() for block in self.blocks if block.kind == "route" and isinstance(block.router, ThreeWayRouter)]
        return bands or None

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Validate the batch; returns the boolean validity mask [B, T]."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids: expected an integer tensor [batch, seq], got {tuple(input_ids.shape)} {input_ids.dtype}")
        batch, seq = input_ids.shape
        if batch == 0 or seq == 0:
            raise ValueError("input_ids: empty batch or sequence")
        if seq > self.config.max_seq_len:
            raise ValueError(f"input_ids: sequence length {seq} exceeds max_seq_len {self.config.max_seq_len}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"input_ids: token ids must lie in [0, {self.config.vocab_size})")
        if attention_mask is None:
            return torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        valid = attention_mask.bool()
        if not torch.equal(valid.to(attention_mask.dtype), attention_mask):
            raise ValueError("attention_mask: values must be 0 or 1")
        if not bool(valid[:, 0].all()):
            raise ValueError("attention_mask: every sequence needs at least one token (right padding only)")
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError("attention_mask: only right padding is supported (ones, then zeros)")
        return valid

    def _routing_info(self, operator: Tensor, entropy: Tensor, gate: Tensor, valid: Tensor) -> RoutingInfo:
        """operator/entropy [B,T,L], gate [B,T]; padding gets -1 / NaN."""
        operator = operator.masked_fill(~valid.unsqueeze(-1), PAD)
        entropy = entropy.masked_fill(~valid.unsqueeze(-1), float("nan"))
        gate = gate.masked_fill(~valid, float("nan"))
        counts = torch.stack([torch.bincount(op[op >= 0].long(), minlength=4) for op in operator.permute(2, 0, 1)])
        return RoutingInfo(operator, entropy, gate, counts)

    def _finish_flops(self, ctx: _InferContext, logits_per_seq: Tensor, tokens_per_seq: Tensor, pairs_per_seq: Tensor) -> None:
        """LM head and the dense-baseline equivalent, in total and per sequence."""
        cfg = self.config
        head = fl.lm_head_flops(cfg.d_model, cfg.vocab_size, 1)
        ctx.flops.lm_head = head * float(logits_per_seq.sum())
        self._dense_flops(ctx.flops, int(tokens_per_seq.sum()), int(pairs_per_seq.sum()))
        dense_layer = fl.attention_flops(cfg.d_model, 1, 0) * tokens_per_seq + fl.attention_flops(cfg.d_model, 0, 1) * pairs_per_seq
        dense_layer = dense_layer + fl.ffn_flops(cfg.d_model, cfg.d_ff, 1) * tokens_per_seq
        ctx.flops.per_sequence_executed = (ctx.seq_executed + head * logits_per_seq).tolist()
        ctx.flops.per_sequence_dense = (cfg.n_layers * dense_layer + head * logits_per_seq).tolist()

    def _dense_flops(self, flops: fl.FlopCount, n_tokens: int, pairs: int) -> None:
        """Dense-baseline-equivalent: full attention + FFN in every layer, and the LM head."""
        cfg = self.config
        per_layer = fl.attention_flops(cfg.d_model, n_tokens, pairs) + fl.ffn_flops(cfg.d_model, cfg.d_ff, n_tokens)
        flops.dense_per_layer = [per_layer] * cfg.n_layers

    # ------------------------------------------------------------------ reference path
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, hard: bool | None = None,
                labels: Tensor | None = None) -> ModelOutput:
        """Reference (training) path. hard=None: SpectralRouter per routing mode, MetaRouter soft;
        hard=True: both routers hard (what inference runs); hard=False: both soft."""
        cfg = self.config
        valid = self._check_inputs(input_ids, attention_mask)
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        x = self.embed(input_ids)
        gate = self.metarouter(x) if self.metarouter is not None else None
        hard_gate = hard is True
        hard_route = hard if hard is not None else cfg.routing != "soft"
        padded = not bool(valid.all())
        causal_mask = _routed_mask(valid, valid) if padded else None
        operators, entropies, penalties = [], [], []
        for block in self.blocks:
            x, operator, entropy, penalty = block.forward_reference(x, positions, valid, causal_mask, gate, hard_gate, hard_route)
            operators.append(operator)
            entropies.append(entropy)
            if penalty is not None:
                penalties.append(penalty)
        logits = self.lm_head(self.final_norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), labels.reshape(-1), ignore_index=-100)
        aux_loss = cfg.reg_weight * torch.stack(penalties).mean() if penalties else logits.new_zeros(())
        gate_out = gate.detach() if gate is not None else torch.full((batch, seq), float("nan"), device=x.device)
        routing = self._routing_info(torch.stack(operators, -1), torch.stack(entropies, -1).detach(), gate_out, valid)
        lengths = valid.sum(1).tolist()
        n_tokens, pairs = sum(lengths), fl.causal_pairs(lengths)
        flops = fl.FlopCount.empty(cfg.n_layers)
        for layer, block in enumerate(self.blocks):
            block.reference_flops(flops, layer, n_tokens, pairs)
        if self.metarouter is not None:
            flops.add(0, "router", 3.0 * cfg.d_model * n_tokens)
        flops.lm_head = fl.lm_head_flops(cfg.d_model, cfg.vocab_size, n_tokens)
        self._dense_flops(flops, n_tokens, pairs)
        return ModelOutput(logits, routing, flops, loss, aux_loss)

    # ------------------------------------------------------------------ inference path
    @torch.no_grad()
    def infer(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> ModelOutput:
        """Hard-gated inference: each operator runs only on the tokens routed to it."""
        return self._prefill(input_ids, attention_mask, collect_kv=False, all_logits=True)[0]

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                all_logits: bool = False, skip_logits: bool = False) -> tuple[ModelOutput, DecodeState]:
        """`infer` plus the KV cache to continue from. Logits only at each sequence's last token
        ([B, 1, V]) unless all_logits; none ([B, 0, V]) with skip_logits (a chunk more will follow)."""
        output, state = self._prefill(input_ids, attention_mask, collect_kv=True, all_logits=all_logits, skip_logits=skip_logits)
        assert state is not None
        return output, state

    def _prefill(self, input_ids: Tensor, attention_mask: Tensor | None, collect_kv: bool,
                 all_logits: bool, skip_logits: bool = False) -> tuple[ModelOutput, DecodeState | None]:
        cfg = self.config
        valid = self._check_inputs(input_ids, attention_mask)
        batch, seq = input_ids.shape
        batch_idx, positions = valid.nonzero(as_tuple=True)
        embeddings = self.embed(input_ids)
        x = embeddings[batch_idx, positions]
        gate_full = self.metarouter(embeddings) if self.metarouter is not None else None
        gate = gate_full[batch_idx, positions] if gate_full is not None else None
        ctx = _InferContext(batch_idx, positions, batch, cfg.n_layers, None, collect_kv)
        x, operator, entropy = self._run_blocks(x, gate, ctx)
        lengths = valid.sum(1)
        if skip_logits:
            logits = x.new_zeros((batch, 0, cfg.vocab_size))
        elif all_logits and x.shape[0] == batch * seq:  # no padding: flat order is [B, T] order
            logits = self.lm_head(self.final_norm(x)).view(batch, seq, cfg.vocab_size)
        elif all_logits:
            logits = x.new_zeros((batch, seq, cfg.vocab_size))
            logits[batch_idx, positions] = self.lm_head(self.final_norm(x))
        else:
            last = torch.cumsum(lengths, 0) - 1  # flat index of each sequence's last token
            logits = self.lm_head(self.final_norm(x[last])).unsqueeze(1)
        tokens = lengths.double()
        heads = torch.zeros_like(tokens) if skip_logits else tokens if all_logits else torch.ones_like(tokens)
        self._finish_flops(ctx, heads, tokens, tokens * (tokens + 1) / 2)
        op_full = torch.full((batch, seq, cfg.n_layers), PAD, dtype=torch.int8, device=x.device)
        op_full[batch_idx, positions] = operator
        ent_full = torch.full((batch, seq, cfg.n_layers), float("nan"), dtype=entropy.dtype, device=x.device)
        ent_full[batch_idx, positions] = entropy
        gate_out = gate_full if gate_full is not None else torch.full((batch, seq), float("nan"), device=x.device)
        output = ModelOutput(logits, self._routing_info(op_full, ent_full, gate_out, valid), ctx.flops)
        state = None
        if collect_kv:
            embed_sum = (embeddings * valid.unsqueeze(-1).to(embeddings.dtype)).sum(1)
            state = DecodeState(ctx.kv, lengths.clone(), embed_sum)
        return output, state

    def _run_blocks(self, x: Tensor, gate: Tensor | None, ctx: _InferContext) -> tuple[Tensor, Tensor, Tensor]:
        operators, entropies = [], []
        for layer, block in enumerate(self.blocks):
            x, operator, entropy = block.forward_infer(x, gate, layer, ctx)
            operators.append(operator)
            entropies.append(entropy)
        return x, torch.stack(operators, -1), torch.stack(entropies, -1)

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, state: DecodeState) -> ModelOutput:
        """One new token per sequence of `state` (tokens [B]); extends the cache in place.
        Returns logits [B, 1, V] and the routing of these tokens."""
        cfg = self.config
        batch = len(state)
        if tokens.shape != (batch,):
            raise ValueError(f"tokens: expected shape ({batch},), got {tuple(tokens.shape)}")
        if int(state.lengths.max()) >= cfg.max_seq_len:
            raise ValueError(f"state: a sequence reached max_seq_len {cfg.max_seq_len}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size:
            raise ValueError(f"tokens: token ids must lie in [0, {cfg.vocab_size})")
        x = self.embed(tokens)
        positions = state.lengths.clone()
        gate = None
        state.embed_sum.add_(x)
        if self.metarouter is not None:
            gate = self.metarouter.gate_from_mean(state.embed_sum / (positions + 1).unsqueeze(-1).to(x.dtype))
        batch_idx = torch.arange(batch, device=tokens.device)
        ctx = _InferContext(batch_idx, positions, batch, cfg.n_layers, state, collect_kv=False)
        x, operator, entropy = self._run_blocks(x, gate, ctx)
        state.lengths.add_(1)
        logits = self.lm_head(self.final_norm(x)).unsqueeze(1)
        ones = torch.ones(batch, dtype=torch.float64, device=x.device)
        self._finish_flops(ctx, ones, ones, state.lengths.double())
        valid = torch.ones(batch, 1, dtype=torch.bool, device=x.device)
        gate_out = gate.unsqueeze(1) if gate is not None else torch.full((batch, 1), float("nan"), device=x.device)
        routing = self._routing_info(operator.unsqueeze(1), entropy.unsqueeze(1), gate_out, valid)
        return ModelOutput(logits, routing, ctx.flops)

    @torch.no_grad()
    def extend(self, tokens: Tensor, state: DecodeState, all_logits: bool = False, skip_logits: bool = False) -> ModelOutput:
        """Continue the one sequence of `state` by the n tokens `tokens` [n] in one call (chunked
        prefill); extends the cache in place. Equal to prefilling the whole sequence at once.
        Returns logits [1, n, V] (all_logits), [1, 1, V] (the last token) or [1, 0, V] (skip_logits)."""
        cfg = self.config
        if len(state) != 1:
            raise ValueError(f"state: extend continues one sequence, got {len(state)}")
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens: expected a non-empty 1-D tensor, got shape {tuple(tokens.shape)}")
        n = tokens.numel()
        start = int(state.lengths[0])
        if start + n > cfg.max_seq_len:
            raise ValueError(f"tokens: {start} + {n} tokens exceed max_seq_len {cfg.max_seq_len}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size:
            raise ValueError(f"tokens: token ids must lie in [0, {cfg.vocab_size})")
        x = self.embed(tokens)
        positions = start + torch.arange(n, device=tokens.device)
        gate = None
        if self.metarouter is not None:
            running = state.embed_sum[0] + x.cumsum(0)
            gate = self.metarouter.gate_from_mean(running / (positions + 1).unsqueeze(-1).to(x.dtype))
        state.embed_sum[0].add_(x.sum(0))
        ctx = _InferContext(torch.zeros(n, dtype=torch.long, device=tokens.device), positions, 1, cfg.n_layers, state,
                            collect_kv=False, extend=True)
        x, operator, entropy = self._run_blocks(x, gate, ctx)
        state.lengths[0] += n
        if skip_logits:
            logits = x.new_zeros((1, 0, cfg.vocab_size))
        else:
            logits = self.lm_head(self.final_norm(x if all_logits else x[-1:])).unsqueeze(0)
        tokens_seq = torch.full((1,), float(n), dtype=torch.float64, device=x.device)
        pairs = torch.full((1,), float(n * start + n * (n + 1) / 2), dtype=torch.float64, device=x.device)
        heads = torch.zeros_like(tokens_seq) if skip_logits else tokens_seq if all_logits else torch.ones_like(tokens_seq)
        self._finish_flops(ctx, heads, tokens_seq, pairs)
        valid = torch.ones(1, n, dtype=torch.bool, device=x.device)
        gate_out = gate.unsqueeze(0) if gate is not None else torch.full((1, n), float("nan"), device=x.device)
        routing = self._routing_info(operator.unsqueeze(0), entropy.unsqueeze(0), gate_out, valid)
        return ModelOutput(logits, routing, ctx.flops)

    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | list[int] | None = None, attention_mask: Tensor | None = None,
                 stop_token_ids: list[int] | None = None):  # -> GenerateOutput (import cycle kept out of the signature)
        """Prefill with the inference path, then decode with the routed KV cache (see model.generate)."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, seed, attention_mask, stop_token_ids)
