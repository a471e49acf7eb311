"""ChiarLM: the CHIAR-Former language model (and its full-attention baseline).

Two forward paths over one set of weights:
- `forward` (reference, training): dense compute with masks; soft or hard routing per mode.
- `forward_step` (inference; `infer` / `prefill` / `extend` / `decode_step` wrap it, model/batch_api.py):
  hard gating with real savings. Tokens are packed into a flat [N, d] list of valid tokens, so per-token
  work never touches padding; each operator runs only on the tokens routed to it. FLOPs are priced from the routing result after
  the forward (`model.accounting`), never inside it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import flops as fl
from .accounting import routing_counts
from .attention import RotaryEmbedding
from .batch_api import BatchAPI
from .blocks import AttentionBlock, Block, GatedDCTBlock, ReferenceBatch, RoutedBlock, routed_mask
from .config import ChiarConfig
from .inputs import check_inputs
from .kernels import Kernels, choose_kernels
from .kv_cache import PagedKVCache
from .layers import RMSNorm
from .operators import PAD, Operator
from .output import ModelOutput, RoutingInfo
from .routing import MetaRouter
from .spectral import spectral_dtype
from .step import StepContext, StepOutput, TokenBatch


class ChiarLM(BatchAPI, nn.Module):
    """CHIAR-Former (arch="chiar") or its full-attention baseline (arch="baseline")."""

    def __init__(self, config: ChiarConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        blocks: list[Block]
        if config.arch == "chiar":
            blocks = [GatedDCTBlock(config)]
            blocks += [RoutedBlock(config, self.rope, i) for i in range(config.n_routing_layers)]
            blocks.append(AttentionBlock(config, self.rope))
        else:
            blocks = [AttentionBlock(config, self.rope) for _ in range(config.n_layers)]
        self.blocks = nn.ModuleList(blocks)
        self.metarouter = MetaRouter(d, config.metarouter_bias_init) if config.arch == "chiar" and config.metarouter else None
        self.final_norm = RMSNorm(d, config.norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._kernel_choice = "auto"
        self._kernels: Kernels | None = None

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

    def routed_blocks(self) -> list[RoutedBlock]:
        return [block for block in self.blocks if isinstance(block, RoutedBlock)]

    def routing_cut_points(self) -> list[list[float]]:
        """Per layer, the entropy values its router compares with now: [] where the layer does not route,
        [tau] for the two-operator router, the band [p33, p67] for the three-operator one (what the API reports)."""
        cuts: list[list[float]] = [[] for _ in self.blocks]
        for layer in self.config.routing_layers:
            cuts[layer] = self.blocks[layer].router.cut_points()
        return cuts

    def routing_thresholds(self) -> list[float]:
        """Per routing layer, the centre of its cut points: tau, or the band's middle (learnable in soft/ste)."""
        cuts = self.routing_cut_points()
        return [sum(cuts[layer]) / len(cuts[layer]) for layer in self.config.routing_layers]

    def routing_bands(self) -> list[list[float]] | None:
        """Per routing layer, the current band of a three-operator model (None for two operators)."""
        cuts = self.routing_cut_points()
        return [cuts[layer] for layer in self.config.routing_layers] if self.config.three_operators else None

    def _dense_per_layer(self, n_tokens: int, pairs: float) -> list[float]:
        """Dense-baseline-equivalent per layer: full attention + FFN."""
        cfg = self.config
        return [fl.attention_flops(cfg.d_model, n_tokens, pairs) + fl.ffn_flops(cfg.d_model, cfg.d_ff, n_tokens)] * cfg.n_layers  # type: ignore[arg-type]

    # ------------------------------------------------------------------ reference path
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, hard: bool | None = None,
                labels: Tensor | None = None) -> ModelOutput:
        """Reference (training) path. hard=None: SpectralRouter per routing mode, MetaRouter soft;
        hard=True: both routers hard (what inference runs); hard=False: both soft."""
        cfg = self.config
        valid = check_inputs(self.config, input_ids, attention_mask)
        batch, seq = input_ids.shape
        x = self.embed(input_ids)
        gate = self.metarouter(x) if self.metarouter is not None else None
        padded = not bool(valid.all())
        ref = ReferenceBatch(positions=torch.arange(seq, device=input_ids.device).expand(batch, seq), valid=valid,
                             causal_mask=routed_mask(valid, valid) if padded else None, gate=gate,
                             hard_gate=hard is True, hard_route=hard if hard is not None else cfg.routing != "soft")
        operators, entropies, penalties = [], [], []
        for block in self.blocks:
            x, operator, entropy, penalty = block.forward_reference(x, ref)
            operators.append(operator)
            entropies.append(entropy)
            if penalty is not None:
                penalties.append(penalty)
        logits = self.lm_head(self.final_norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), labels.reshape(-1), ignore_index=-100)
        aux_loss = cfg.reg_weight * torch.stack(penalties).mean() if penalties else logits.new_zeros(())
        operator = torch.stack(operators, -1).masked_fill(~valid.unsqueeze(-1), PAD)
        counts = routing_counts(operator[valid], torch.zeros(int(valid.sum()), dtype=torch.long, device=x.device), 1)[0]
        gate_out = gate.detach() if gate is not None else torch.full((batch, seq), float("nan"), device=x.device)
        routing = RoutingInfo(operator, torch.stack(entropies, -1).detach().masked_fill(~valid.unsqueeze(-1), float("nan")),
                              gate_out.masked_fill(~valid, float("nan")), counts)
        lengths = valid.sum(1).tolist()
        n_tokens, pairs = sum(lengths), fl.causal_pairs(lengths)
        flops = fl.FlopCount.empty(cfg.n_layers)
        for layer, block in enumerate(self.blocks):
            for key, value in block.reference_flops(n_tokens, pairs).items():
                flops.add(layer, key, value)
        if self.metarouter is not None:
            flops.add(0, "router", 3.0 * cfg.d_model * n_tokens)
        flops.lm_head = fl.lm_head_flops(cfg.d_model, cfg.vocab_size, n_tokens)
        flops.dense_per_layer = self._dense_per_layer(n_tokens, pairs)
        return ModelOutput(logits, routing, flops, loss, aux_loss)

    # ------------------------------------------------------------------ inference path
    def set_kernels(self, choice: str) -> None:
        """Kernels of the inference path: "auto" (native where they can run), "native" or "eager"."""
        self._kernel_choice = choice
        self._kernels = choose_kernels(self, choice) if choice != "auto" else None

    @property
    def kernels(self) -> Kernels:
        if self._kernels is None:
            self._kernels = choose_kernels(self, self._kernel_choice)
        return self._kernels

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_kernels"] = None  # packed weights are rebuilt where the copy runs (deepcopy, pickling)
        return state

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self._kernels = None  # a new dtype or device may change which kernels can run
        return super()._apply(fn, recurse)

    def attention_layers(self, always: bool = False) -> int:
        """Layers that hold a KV cache (always: only those every token attends in)."""
        return sum(1 for block in self.blocks if block.has_attention and (not always or isinstance(block, AttentionBlock)))

    def kv_bytes_per_token(self, always: bool = False) -> int:
        """K+V bytes one token adds when it attends in every attention layer (always: only in the layers
        every token attends in)."""
        cfg = self.config
        return self.attention_layers(always) * 2 * cfg.d_model * next(self.parameters()).element_size()

    def new_cache(self, rows: int, tokens_per_row: int, growable: bool = True) -> PagedKVCache:
        return PagedKVCache.for_model(self, rows=rows, tokens_per_row=tokens_per_row, growable=growable)

    @torch.no_grad()
    def forward_step(self, batch: TokenBatch, cache: PagedKVCache) -> StepOutput:
        """The one inference forward: flat tokens continuing any rows of `cache` (prompt chunks, decode
        tokens, scoring windows together), hard-gated, each operator only on the tokens routed to it.
        Extends the cache in place and returns the logits at `batch.logits_at` and every token's routing."""
        cfg = self.config
        n = len(batch)
        if n == 0:
            raise ValueError("batch: no tokens")
        last = 0
        for row, count in batch.spans:
            if cache.positions[row] + count > cfg.max_seq_len:
                raise ValueError(f"row {row}: {cache.positions[row]} + {count} tokens exceed max_seq_len {cfg.max_seq_len}")
            last = max(last, cache.positions[row] + count - 1)
        self.rope.cover(last)  # the kernels read the rotary tables directly
        kernels = self.kernels
        kernels.refresh()
        if not batch.fitted:
            cache.reserve(sum(cache.blocks_needed(batch.spans)))
        native = kernels.step_model()
        out = self._step_native(native, batch, cache) if native is not None else self._step_layers(kernels, batch, cache)
        cache.advance(batch.spans, out.span_counts[:, :, Operator.ATTENTION].tolist())
        return out

    def _step_native(self, native: object, batch: TokenBatch, cache: PagedKVCache) -> StepOutput:
        """The whole forward in one native call (csrc/step.cpp): the per-layer path's ops and bits,
        without the Python between them and with one GIL release instead of one per op."""
        logits, operator, entropy, keys_seen, gate, counts, span_counts = native.step(  # type: ignore[attr-defined]
            batch.tokens, batch.rows, batch.positions, batch.logits_at, [n for _, n in batch.spans], cache.keys, cache.values,
            cache.tables, cache.lengths, cache.free_stack, cache.free_top, cache.embed_sum, self.rope.cos, self.rope.sin)
        return StepOutput(logits, operator.T, entropy.T, gate, counts.tolist(), keys_seen.T, span_counts.numpy())

    def _step_layers(self, kernels: Kernels, batch: TokenBatch, cache: PagedKVCache) -> StepOutput:
        """The forward layer by layer through `kernels` (the eager reference, and models the native step does not cover)."""
        cfg = self.config
        n = len(batch)
        x = F.embedding(batch.tokens, self.embed.weight)
        gate = None if self.metarouter is None else kernels.gate(self.metarouter, x, batch.rows, batch.positions, cache)
        layers = cfg.n_layers
        ctx = StepContext(kernels, cache, batch.rows, batch.positions, gate,
                          operator=torch.empty((layers, n), dtype=torch.int8, device=x.device),
                          entropy=torch.full((layers, n), float("nan"), dtype=spectral_dtype(x.dtype), device=x.device),
                          keys_seen=torch.zeros((layers, n), dtype=torch.int32, device=x.device),
                          counts=[[0] * len(Operator) for _ in range(layers)])
        for layer, block in enumerate(self.blocks):
            x = block.forward_step(x, ctx, layer)
        span_counts = self._span_counts(ctx.operator, batch.spans)
        h = x if batch.logits_at is None else x.index_select(0, batch.logits_at)
        logits = kernels.logits(self, h) if h.shape[0] else x.new_zeros((0, cfg.vocab_size))
        return StepOutput(logits, ctx.operator.T, ctx.entropy.T, gate, ctx.counts, ctx.keys_seen.T, span_counts)

    @staticmethod
    def _span_counts(operator: Tensor, spans: list[tuple[int, int]]) -> np.ndarray:
        """Tokens per (span, layer, operator id) from operator [L, N]: one bincount, one read."""
        if len(spans) == operator.shape[1]:  # one token per span (decode)
            index = torch.arange(len(spans), device=operator.device)
        else:
            index = torch.repeat_interleave(torch.arange(len(spans), device=operator.device),
                                            torch.tensor([n for _, n in spans], device=operator.device))
        return routing_counts(operator.T, index, len(spans)).cpu().numpy()
