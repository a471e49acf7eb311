"""The limits the server enforces, declared in /openapi.json (maxima, list sizes, the per-model context).

A limit that depends on the served model is declared with the bound the server enforces for the most
lenient served model, and its description names each model's own bound. What JSON Schema cannot say
(prompt tokens + new tokens <= the context, a request's scored tokens, the KV budget) is said in the
description and answered with a 400 naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.schemas import MAX_STOP

GENERATE_DEFAULT, COMPLETIONS_DEFAULT = 64, 16  # the request models' defaults (a default is capped, never refused)


@dataclass(frozen=True)
class ModelLimits:
    name: str
    context: int
    max_new_tokens: int  # Service.max_new_tokens


@dataclass(frozen=True)
class DocLimits:
    """Everything the document declares, from the settings and the served models."""

    vocab_size: int
    max_prompts: int
    models: tuple[ModelLimits, ...]

    @property
    def context(self) -> int:
        return max(m.context for m in self.models)

    @property
    def max_new_tokens(self) -> int:
        return max(m.max_new_tokens for m in self.models)

    @property
    def max_ids(self) -> int:
        """Most ids one token-id prompt may hold: one new token must still fit after BOS."""
        return self.context - 2

    def per_model(self, what: str) -> str:
        values = ", ".join(f"{m.name} {getattr(m, what) if what != 'max_ids' else m.context - 2}" for m in self.models)
        return f" (per model: {values})" if len(self.models) > 1 else ""


def _options(node: dict[str, Any]) -> list[dict[str, Any]]:
    return node.get("anyOf", [node])


def _describe(node: dict[str, Any], text: str) -> None:
    node["description"] = (node.get("description", "").rstrip(".") + ". " if node.get("description") else "") + text


def _new_tokens(node: dict[str, Any], limits: DocLimits, default: int | None) -> None:
    for option in _options(node):
        if option.get("type") == "integer":
            option["maximum"] = limits.max_new_tokens
    if default is not None:
        node["default"] = min(default, limits.max_new_tokens)
    _describe(node, f"At most {limits.max_new_tokens}{limits.per_model('max_new_tokens')}: the model's context less BOS "
              "and one prompt token, or the server's --max-new-tokens; prompt + these must fit the context (400 "
              "context_length_exceeded otherwise). A default is lowered to what the prompt leaves.")


def _prompts(node: dict[str, Any], limits: DocLimits, what: str) -> None:
    """maxItems `max_prompts` on the list-of-prompts forms of a prompt/text field. The ids of one prompt get no
    maxItems: their bound is not one number but the context less the new tokens (said in the description)."""
    for option in _options(node):
        if option.get("type") == "array" and option.get("items", {}).get("type") != "integer":
            option["maxItems"] = limits.max_prompts
    ids = any(o.get("type") == "array" and o.get("items", {}).get("type") in ("integer", "array") for o in _options(node))
    _describe(node, f"At most {limits.max_prompts} {what} (--max-prompts)" + (
        f"; every prompt's tokens (BOS included) + its new tokens must fit the model's context{limits.per_model('context')} "
        f"(400 context_length_exceeded): a token-id prompt without BOS holds at most {limits.max_ids} ids{limits.per_model('max_ids')}"
        " with one new token." if ids else "."))


def _stop(node: dict[str, Any]) -> None:
    for option in _options(node):
        if option.get("type") == "array":
            option["maxItems"] = MAX_STOP


def declare_limits(schemas: dict[str, Any], limits: DocLimits) -> None:
    """Write the limits into the request schemas (FastAPI's components)."""
    def props(name: str) -> dict[str, Any]:
        return schemas.get(name, {}).get("properties", {})

    generate, completion, chat, perplexity = (props(n) for n in ("GenerateRequest", "CompletionRequest",
                                                                  "ChatCompletionRequest", "PerplexityRequest"))
    if "max_new_tokens" in generate:
        _new_tokens(generate["max_new_tokens"], limits, GENERATE_DEFAULT)
    if "max_tokens" in completion:
        _new_tokens(completion["max_tokens"], limits, COMPLETIONS_DEFAULT)
        _prompts(completion["prompt"], limits, "prompts")
    for field in ("max_completion_tokens", "max_tokens"):
        if field in chat:
            _new_tokens(chat[field], limits, None)
    if "text" in perplexity:
        _prompts(perplexity["text"], limits, "texts")
        _describe(perplexity["text"], "All texts together are scored in at most --max-score-tokens tokens.")
    for fields in (generate, completion):
        if "stop" in fields:
            _stop(fields["stop"])
