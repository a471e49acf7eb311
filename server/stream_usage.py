"""Usage in streamed OpenAI answers (`stream_options`), shared by /v1/completions and /v1/chat/completions.

`include_usage`: every chunk has `usage: null` (chat) or none (completions), and a last chunk with
`choices: []` carries the request's totals, as OpenAI does. With vLLM's `continuous_usage_stats` as
well, every chunk carries the usage of its choice so far (that choice's prompt tokens, the tokens it
has generated up to and including the chunk), as vLLM does; load generators read it per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.schemas import StreamOptions


@dataclass
class StreamUsage:
    """Token counts of one streamed request: per choice as it streams, and its totals."""

    include: bool
    continuous: bool
    prompt_tokens: list[int]  # of each choice's prompt (BOS counted once)
    total_prompt_tokens: int  # what the final usage reports (each prompt once, whatever `n` is)
    completion: list[int] = field(init=False)
    cached: int = 0  # prompt tokens taken from the prefix cache (each prompt once)

    def __post_init__(self) -> None:
        self.completion = [0] * len(self.prompt_tokens)

    @classmethod
    def of(cls, options: StreamOptions | None, prompt_tokens: list[int], total_prompt_tokens: int) -> StreamUsage:
        include = bool(options and options.include_usage)
        return cls(include, include and bool(options and options.continuous_usage_stats), prompt_tokens, total_prompt_tokens)

    def generated(self, choice: int, tokens: int) -> None:
        self.completion[choice] += tokens

    def finished(self, choice: int, tokens: int, cached: int = 0) -> None:
        """The choice's final count (the engine's, which also counts tokens a stop string cut), and the cached
        prompt tokens it adds to the totals."""
        self.completion[choice] = tokens
        self.cached += cached

    def of_choice(self, choice: int) -> dict[str, int] | None:
        """The usage a chunk of `choice` carries: its counts so far with continuous stats, else None."""
        if not self.continuous:
            return None
        prompt, done = self.prompt_tokens[choice], self.completion[choice]
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def totals(self) -> dict[str, Any]:
        done = sum(self.completion)
        return {"prompt_tokens": self.total_prompt_tokens, "completion_tokens": done,
                "total_tokens": self.total_prompt_tokens + done, "prompt_tokens_details": {"cached_tokens": self.cached}}
