"""ChiarLM: the CHIAR-Former language model (and its full-attention baseline).

Two forward paths over one set of weights:
- `forward` (reference, training): dense compute with masks; soft or hard routing per mode.
- `infer` / `prefill` / `extend` / `decode_step` (inference): hard gating with real savings. Tokens
  are packed into a flat [N, d] list of valid tokens, so per-token work never touches padding; each
  operator runs only on the tokens routed to it. FLOPs are priced from the routing result after
  the forward (`model.accounting`), never inside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import flops as fl
from .accounting import executed_flops, routing_counts
from .attention import RotaryEmbedding
from .blocks import AttentionBlock, Block, GatedDCTBlock, ReferenceBatch, RoutedBlock, routed_mask
from .config import ChiarConfig
from .infer_batch import InferBatch
from .kv_cache import DecodeState
from .layers import RMSNorm
from .operators import PAD
from .output import ModelOutput, RoutingInfo
from .routing import MetaRouter, SpectralRouter, ThreeWayRouter
from .spectral import spectral_dtype


class ChiarLM(nn.Module):
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

    def routing_thresholds(self) -> list[float]:
        """Current per-routing-layer thresholds (learnable in soft/ste mode)."""
        taus = []
        for block in self.routed_blocks():
            router = block.router
            if isinstance(router, SpectralRouter):
                taus.append(float(router.threshold.detach()))
            else:
                taus.append(float(router.band.detach().mean()))
        return taus

    def routing_bands(self) -> list[list[float]] | None:
        bands = [block.router.band.detach().tolist() for block in self.routed_blocks() if isinstance(block.router, ThreeWayRouter)]
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

    def _check_tokens(self, tokens: Tensor) -> None:
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(f"tokens: token ids must lie in [0, {self.config.vocab_size})")

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
        valid = self._check_inputs(input_ids, attention_mask)
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
    def _run_blocks(self, x: Tensor, gate: Tensor | None, batch: InferBatch) -> tuple[Tensor, Tensor, Tensor]:
        """All blocks on flat tokens; returns x and operator / entropy [N, L] (NaN where not computed)."""
        n, n_layers = x.shape[0], len(self.blocks)
        operators = torch.empty((n, n_layers), dtype=torch.int8, device=x.device)
        entropies = torch.full((n, n_layers), float("nan"), dtype=spectral_dtype(x.dtype), device=x.device)
        for layer, block in enumerate(self.blocks):
            x, operator, entropy = block.forward_infer(x, gate, layer, batch)
            operators[:, layer] = operator
            if entropy is not None:
                entropies[:, layer] = entropy
        return x, operators, entropies

    def _account(self, batch: InferBatch, operator: Tensor, cache_after: list[list[int] | None] | None,
                 heads: list[float], tokens: list[float], pairs: list[float]) -> tuple[fl.FlopCount, Tensor]:
        """FLOPs of the call from its routing (executed, dense equivalent, per sequence) and the [L, 4] counts.
        heads / tokens / pairs per sequence: logits computed, new tokens, and full causal (query, key) pairs."""
        cfg = self.config
        counts = routing_counts(operator, batch.batch_idx, batch.batch_size)
        flops, per_sequence = executed_flops(self.blocks, counts.tolist(), cache_after, self.metarouter is not None)
        head = fl.lm_head_flops(cfg.d_model, cfg.vocab_size, 1)
        flops.lm_head = head * sum(heads)
        flops.dense_per_layer = self._dense_per_layer(int(sum(tokens)), sum(pairs))
        flops.per_sequence_executed = [executed + head * h for executed, h in zip(per_sequence, heads)]
        flops.per_sequence_dense = [cfg.n_layers * (fl.attention_flops(cfg.d_model, t, p) + fl.ffn_flops(cfg.d_model, cfg.d_ff, t))  # type: ignore[arg-type]
                                    + head * h for t, p, h in zip(tokens, pairs, heads)]
        return flops, counts.sum(0)

    @staticmethod
    def _cache_lengths(state: DecodeState) -> list[list[int] | None]:
        return [None if layer is None else layer.lengths.tolist() for layer in state.layers]

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
        dense = attention_mask is None or bool(valid.all())  # no padding: flat order is [B, T] order
        batch_idx, positions = valid.nonzero(as_tuple=True)
        embeddings = self.embed(input_ids)
        x = embeddings.view(batch * seq, -1) if dense else embeddings[batch_idx, positions]
        gate_full = self.metarouter(embeddings) if self.metarouter is not None else None
        gate = None if gate_full is None else gate_full.reshape(-1) if dense else gate_full[batch_idx, positions]
        run = InferBatch(batch_idx, positions, batch, cfg.n_layers, None, collect_kv)
        x, operator, entropy = self._run_blocks(x, gate, run)
        lengths = valid.sum(1)
        if skip_logits:
            logits = x.new_zeros((batch, 0, cfg.vocab_size))
        elif all_logits and dense:
            logits = self.lm_head(self.final_norm(x)).view(batch, seq, cfg.vocab_size)
        elif all_logits:
            logits = x.new_zeros((batch, seq, cfg.vocab_size))
            logits[batch_idx, positions] = self.lm_head(self.final_norm(x))
        else:
            last = torch.cumsum(lengths, 0) - 1  # flat index of each sequence's last token
            logits = self.lm_head(self.final_norm(x[last])).unsqueeze(1)
        tokens = [float(n) for n in lengths.tolist()]
        heads = [0.0] * batch if skip_logits else tokens if all_logits else [1.0] * batch
        flops, counts = self._account(run, operator, None, heads, tokens, [t * (t + 1) / 2 for t in tokens])
        if dense:
            op_full, ent_full = operator.view(batch, seq, -1), entropy.view(batch, seq, -1)
        else:
            op_full = torch.full((batch, seq, cfg.n_layers), PAD, dtype=torch.int8, device=x.device)
            op_full[batch_idx, positions] = operator
            ent_full = torch.full((batch, seq, cfg.n_layers), float("nan"), dtype=entropy.dtype, device=x.device)
            ent_full[batch_idx, positions] = entropy
        gate_out = gate_full.masked_fill(~valid, float("nan")) if gate_full is not None else torch.full((batch, seq), float("nan"), device=x.device)
        output = ModelOutput(logits, RoutingInfo(op_full, ent_full, gate_out, counts), flops)
        state = None
        if collect_kv:
            embed_sum = (embeddings * valid.unsqueeze(-1).to(embeddings.dtype)).sum(1)
            state = DecodeState(run.kv, lengths.clone(), embed_sum)
        return output, state

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, state: DecodeState) -> ModelOutput:
        """One new token per sequence of `state` (tokens [B]); extends the cache in place.
        Returns logits [B, 1, V] and the routing of these tokens."""
        cfg = self.config
        batch = len(state)
        if tokens.shape != (batch,):
            raise ValueError(f"tokens: expected shape ({batch},), got {tuple(tokens.shape)}")
        longest = int(state.lengths.max())
        if longest >= cfg.max_seq_len:
            raise ValueError(f"state: a sequence reached max_seq_len {cfg.max_seq_len}")
        self._check_tokens(tokens)
        state.reserve_step(longest)  # once per step, so no layer reads lengths back to grow its cache
        x = self.embed(tokens)
        positions = state.lengths.clone()
        gate = None
        state.embed_sum.add_(x)
        if self.metarouter is not None:
            gate = self.metarouter.gate_from_mean(state.embed_sum / (positions + 1).unsqueeze(-1).to(x.dtype))
        run = InferBatch(torch.arange(batch, device=tokens.device), positions, batch, cfg.n_layers, state, collect_kv=False)
        x, operator, entropy = self._run_blocks(x, gate, run)
        state.lengths.add_(1)
        logits = self.lm_head(self.final_norm(x)).unsqueeze(1)
        ones = [1.0] * batch
        flops, counts = self._account(run, operator, self._cache_lengths(state), ones, ones, [float(n) for n in state.lengths.tolist()])
        gate_out = gate.unsqueeze(1) if gate is not None else torch.full((batch, 1), float("nan"), device=x.device)
        return ModelOutput(logits, RoutingInfo(operator.unsqueeze(1), entropy.unsqueeze(1), gate_out, counts), flops)

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
        self._check_tokens(tokens)
        x = self.embed(tokens)
        positions = start + torch.arange(n, device=tokens.device)
        gate = None
        if self.metarouter is not None:
            running = state.embed_sum[0] + x.cumsum(0)
            gate = self.metarouter.gate_from_mean(running / (positions + 1).unsqueeze(-1).to(x.dtype))
        state.embed_sum[0].add_(x.sum(0))
        run = InferBatch(torch.zeros(n, dtype=torch.long, device=tokens.device), positions, 1, cfg.n_layers, state,
                         collect_kv=False, extend=True)
        x, operator, entropy = self._run_blocks(x, gate, run)
        state.lengths[0] += n
        if skip_logits:
            logits = x.new_zeros((1, 0, cfg.vocab_size))
        else:
            logits = self.lm_head(self.final_norm(x if all_logits else x[-1:])).unsqueeze(0)
        heads = [0.0] if skip_logits else [float(n)] if all_logits else [1.0]
        flops, counts = self._account(run, operator, self._cache_lengths(state), heads, [float(n)], [n * start + n * (n + 1) / 2])
        gate_out = gate.unsqueeze(0) if gate is not None else torch.full((1, n), float("nan"), device=x.device)
        return ModelOutput(logits, RoutingInfo(operator.unsqueeze(0), entropy.unsqueeze(0), gate_out, counts), flops)
