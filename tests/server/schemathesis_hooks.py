"""Schemathesis hooks for tests/server/test_openapi.py (loaded through SCHEMATHESIS_HOOKS).

The schema cannot say "rendered prompt + max tokens <= the context" (it depends on the tokenizer), so
schema-valid cases are kept inside the tiny test model's 128-token context, which also keeps the
CPU run short: large new-token counts are lowered and long chat texts cut. Only values that are
already valid are changed, and they stay valid, so negative cases stay negative.
"""

from __future__ import annotations

from typing import Any

import schemathesis

MAX_NEW = 4
MAX_TEXT = 20  # characters in all messages together (a character can be 4 byte-level tokens)
MAX_MESSAGES = 3


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens", "max_new_tokens"):
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_NEW:  # 607.0 is an integer too
            body[key] = MAX_NEW
    if getattr(case, "path", "") == "/v1/generate" and "max_new_tokens" not in body:
        body["max_new_tokens"] = MAX_NEW  # the default (64) + a long prompt would not fit the tiny context
    for key in ("prompt", "text"):  # native and completions texts: the same character budget
        value = body.get(key)
        if isinstance(value, str) and value:
            body[key] = value[:MAX_TEXT]
        elif isinstance(value, list):
            body[key] = [v[:MAX_TEXT] if isinstance(v, str) and v else v[:MAX_TEXT] if isinstance(v, list) and v else v
                         for v in value]
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > 0:
        del messages[MAX_MESSAGES:]
        budget = MAX_TEXT
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                message["content"], budget = content[:budget], budget - len(content[:budget])
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        part["text"], budget = part["text"][:budget], budget - len(part["text"][:budget])
            if isinstance(message.get("name"), str):
                message["name"] = message["name"][:8]
