"""What every protocol's request and response models share: the strict request base, text and stop
rules, the model choice, `Usage` and `StreamOptions`. The sampling fields are server/sampling_params.py;
each protocol's models are its own module (native_schemas, openai_schemas, tokenizer_schemas).

Request models are strict: no bool where an integer or float is expected, no string where a number
is, no 0/1 where a bool is, and `[true, false]` is not a list of token ids. The validation handler
(server/errors.py) answers 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from server.sampling_params import MAX_SEED, NUMBER

MAX_STOP = 8
LONG_LIST = 64  # a prompt list this long that starts with an id is validated as ids only

ModelId = Annotated[str | None, Field(description="served model id (GET /v1/models); default: the first --checkpoint")]
Int = Annotated[int, NUMBER]  # JSON Schema integers in lax models (1.0 is one; true and "1" are not)
Float = Annotated[float, NUMBER]


def utf8_text(value: str, empty_ok: bool = False) -> str:
    """`value` if it is (non-empty unless empty_ok) text that encodes as UTF-8, else a ValueError."""
    if not value and not empty_ok:
        raise ValueError("must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode text (unpaired surrogate at character {exc.start})") from None
    return value


def _any_text(value: str) -> str:
    return utf8_text(value, empty_ok=True)


Text = Annotated[str, AfterValidator(utf8_text)]  # non-empty text
AnyText = Annotated[str, AfterValidator(_any_text)]  # text, possibly empty


def stop_list(value: str | list[str] | None) -> list[str]:
    """`stop` as a list of at most MAX_STOP strings (an empty one never matches; OpenAI accepts it too)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    if len(items) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings, got {len(items)}")
    for item in items:
        utf8_text(item, empty_ok=True)
    return items


def _integral(value: Any) -> Any:
    """1.0 -> 1 (a JSON Schema integer may be written with a zero fraction); bools and 1.5 stay as they are."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_SEED:
        return int(value)
    if isinstance(value, list):
        kinds = set(map(type, value))  # at C speed: a 1 MiB list of ids costs milliseconds, not a Python call per item
        return [_integral(v) for v in value] if float in kinds or list in kinds else value
    return value


def _int_only(annotation: Any) -> bool:
    """True when the field takes integers (or lists of them) and no floats."""
    text = str(annotation)
    return "int" in text and "float" not in text


class StrictRequest(BaseModel):
    """Base of the native and completions request bodies: unknown fields and type coercion are refused
    (integral numbers written as 1.0 count as integers, as in JSON Schema)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, info in cls.model_fields.items():
            if name in out and _int_only(info.annotation):
                out[name] = _integral(out[name])
        return out


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens taken from the prefix cache instead of computed")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(None, description="as OpenAI reports it: the cached prompt tokens")

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class StreamOptions(BaseModel):
    """`stream_options` of /v1/completions and /v1/chat/completions (the one definition of both).

    OpenAI's `include_usage` and vLLM's `continuous_usage_stats` (load generators such as guidellm send
    it); other keys are ignored like unknown request fields, so a client's newer option never fails a run.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = Field(False, description="a last chunk with `choices: []` carries the request's usage; "
                                "every other chunk has `usage: null`")
    continuous_usage_stats: bool = Field(False, description="vLLM's extension, with include_usage: every chunk "
                                         "carries the usage of its choice so far (prompt tokens and tokens "
                                         "generated up to it)")
