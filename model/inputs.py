"""Checks of the token batches the model's batch-shaped entry points take (ids, right padding)."""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ChiarConfig


def check_inputs(config: ChiarConfig, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Validate the batch; returns the boolean validity mask [B, T]."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"input_ids: expected an integer tensor [batch, seq], got {tuple(input_ids.shape)} {input_ids.dtype}")
    batch, seq = input_ids.shape
    if batch == 0 or seq == 0:
        raise ValueError("input_ids: empty batch or sequence")
    if seq > config.max_seq_len:
        raise ValueError(f"input_ids: sequence length {seq} exceeds max_seq_len {config.max_seq_len}")
    check_tokens(config, input_ids, "input_ids")
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


def check_tokens(config: ChiarConfig, tokens: Tensor, param: str = "tokens") -> None:
    """Every id in [0, vocab_size); the error names `param`."""
    if int(tokens.min()) < 0 or int(tokens.max()) >= config.vocab_size:
        raise ValueError(f"{param}: token ids must lie in [0, {config.vocab_size})")
