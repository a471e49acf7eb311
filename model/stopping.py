"""Stopping rules shared by `model.generate` and the server: eos, stop tokens, stop strings, length, context."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class FinishReason(StrEnum):
    EOS = "eos"  # the end-of-sequence token (not shown in the text)
    STOP = "stop"  # a stop token or a stop string
    LENGTH = "length"  # max_new_tokens reached, or the context is full


@dataclass(frozen=True)
class StoppingCriteria:
    """When one sequence stops. `check` runs once per generated token, after it was appended."""

    max_new_tokens: int
    max_seq_len: int
    eos_token_id: int | None = None  # None: eos is an ordinary token (ignore_eos)
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)

    def check(self, token: int, n_generated: int, total_length: int, stop_string_seen: bool = False) -> FinishReason | None:
        """token: the token just generated; n_generated counts it; total_length = prompt + generated."""
        if token == self.eos_token_id:
            return FinishReason.EOS
        if token in self.stop_token_ids or stop_string_seen:
            return FinishReason.STOP
        if n_generated >= self.max_new_tokens or total_length >= self.max_seq_len:
            return FinishReason.LENGTH
        return None
