"""What the OpenAI routes (/v1/completions, /v1/chat/completions) share: one request being served (its
id, creation time and jobs), the one finish-reason mapping, and the framing of its stream chunks."""

from __future__ import annotations

import time
import uuid
from typing import Any

from server.schemas import StreamOptions
from server.service import Jobs, Service, sse
from server.stream_usage import StreamUsage

# The engine's finish reasons as OpenAI spells them: EOS and stop strings are both "stop".
FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}


def finish_reason(reason: str | None) -> str:
    """OpenAI's finish_reason of an engine result (None: nothing was generated, as with max_tokens 0: "length")."""
    return "length" if reason is None else FINISH_REASONS[str(reason)]


class OpenAIServing:
    """One OpenAI request being served: the model's service, the response id and creation time, its jobs
    (server.service.Jobs) and, when streamed, its usage counts."""

    id_prefix = ""
    chunk_object = ""

    def __init__(self, svc: Service, stream_options: StreamOptions | None, choice_prompt_tokens: list[int],
                 prompt_tokens: int) -> None:
        """`choice_prompt_tokens`: the prompt tokens of each choice; `prompt_tokens`: the request's (each prompt once)."""
        self.svc = svc
        self.rid = self.id_prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.jobs = Jobs(svc)
        self.n_choices = len(choice_prompt_tokens)
        self.prompt_tokens = prompt_tokens
        self.usage = StreamUsage.of(stream_options, choice_prompt_tokens, prompt_tokens)

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        """One `data:` event; with include_usage every chunk carries `usage` (null unless continuous stats)."""
        data: dict[str, Any] = {"id": self.rid, "object": self.chunk_object, "created": self.created,
                                "model": self.svc.name, "choices": choices}
        if self.usage.include:
            data["usage"] = usage
        return sse(data)

    def usage_chunk(self) -> bytes:
        """The last chunk with include_usage: no choices, the request's totals."""
        return self.chunk([], self.usage.totals())

