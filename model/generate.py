"""Autoregressive generation on the hard-gated path: prefill, then batched decode with the routed KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .flops import FlopCount
from .output import ModelOutput
from .sampling import make_generator, sample_next
from .stopping import FinishReason, StoppingCriteria

if TYPE_CHECKING:
    from .chiar import ChiarLM


@dataclass
class GenerateOutput:
    tokens: list[list[int]]  # new tokens per sequence (a stop token, when hit, included)
    finish_reasons: list[str]  # FinishReason values: "length" | "stop" (a stop token)
    prompt_output: ModelOutput  # the prefill's output (logits at each prompt's last token)
    decode_flops: FlopCount
    decode_outputs: list[ModelOutput] = field(default_factory=list, repr=False)


def generate(model: ChiarLM, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | list[int] | None = None, attention_mask: Tensor | None = None,
             stop_token_ids: list[int] | None = None) -> GenerateOutput:
    """Generate up to max_new_tokens per sequence (right-padded prompts may differ in length)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: must be >= 1, got {top_k}")
    batch = input_ids.shape[0]
    prompt_lengths = attention_mask.sum(1) if attention_mask is not None else torch.full((batch,), input_ids.shape[1])
    if int(prompt_lengths.max()) + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"max_new_tokens: prompt ({int(prompt_lengths.max())}) + {max_new_tokens} exceeds max_seq_len {model.config.max_seq_len}"
        )
    seeds = seed if isinstance(seed, list) else [None if seed is None else seed + b for b in range(batch)]
    if len(seeds) != batch:
        raise ValueError(f"seed: expected {batch} seeds, got {len(seeds)}")
    generators: list[torch.Generator | None] = [make_generator(s) for s in seeds]
    prompt_list = prompt_lengths.tolist()
    criteria = StoppingCriteria(max_new_tokens, model.config.max_seq_len, None, frozenset(stop_token_ids or []))

    prompt_output, state = model.prefill(input_ids, attention_mask)
    logits = prompt_output.logits[:, -1]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    reasons = [FinishReason.LENGTH.value] * batch
    active = list(range(batch))  # original index of each row still decoding
    decode_flops = FlopCount.empty(model.config.n_layers)
    decode_outputs: list[ModelOutput] = []
    while active:
        next_tokens = sample_next(
            logits, [temperature] * len(active), [top_k] * len(active), [top_p] * len(active), [generators[b] for b in active]
        )
        keep = []
        for row, b in enumerate(active):
            token = int(next_tokens[row])
            tokens[b].append(token)
            reason = criteria.check(token, len(tokens[b]), int(prompt_list[b]) + len(tokens[b]))
            if reason is None:
                keep.append(row)
            else:
                reasons[b] = reason.value
        if not keep:
            break
        if len(keep) < len(active):
            state = state.select(keep)
            next_tokens = next_tokens[keep]
            active = [active[row] for row in keep]
        out = model.decode_step(next_tokens, state)
        decode_flops += out.flops
        decode_outputs.append(out)
        logits = out.logits[:, -1]
    return GenerateOutput(tokens, reasons, prompt_output, decode_flops, decode_outputs)
