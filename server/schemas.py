"""Request and response models (pydantic); range checks here, context-length checks in the routes.

Request models are strict: no bool where an integer or float is expected, no string where a number
is, no 0/1 where a bool is, and `[true, false]` is not a list of token ids. The validation handler
(server/errors.py) answers 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    field_validator,
    model_validator,
)

MAX_STOP = 8
LONG_LIST = 64  # a prompt list this long that starts with an id is validated as ids only
MAX_SEED = 2**53 - 1  # exact in a JSON number (IEEE double), so clients never round a seed

MIN_TEMPERATURE = 1e-4  # below it logits / T overflow float32 for large logits; it is greedy in all but name
MIN_TOP_P = 1.2e-38  # the smallest normal float32: smaller masses underflow to 0 in the sampler


def _temperature(value: float) -> float:
    if 0.0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}; smaller values underflow, got {value!r}")
    return value


def _top_p(value: float) -> float:
    if value < MIN_TOP_P:
        raise ValueError(f"must be at least {MIN_TOP_P:g} (smaller values underflow), got {value!r}")
    return value


Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False), AfterValidator(_temperature),
                        WithJsonSchema({"anyOf": [{"type": "number", "const": 0},
                                                  {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": 2.0}],
                                        "description": "0 = greedy, else in [1e-4, 2] (OpenAI's range; smaller values underflow)"})]
TopP = Annotated[float, Field(ge=MIN_TOP_P, le=1.0, allow_inf_nan=False, description="nucleus mass in (0, 1]; below 1.2e-38 it underflows"),
                 AfterValidator(_top_p)]
TopK = Annotated[int, Field(ge=1, description="sample among the k most likely tokens")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="same seed -> same text, alone or under load")]
ModelId = Annotated[str | None, Field(description="served model id (GET /v1/models); default: the first --checkpoint")]


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


_TOKEN_IDS = TypeAdapter(list[int], config=ConfigDict(strict=True))
Text = Annotated[str, AfterValidator(utf8_text)]  # non-empty text
AnyText = Annotated[str, AfterValidator(_any_text)]  # text, possibly empty


def _stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    if len(items) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings, got {len(items)}")
    for item in items:
        utf8_text(item, empty_ok=True)  # an empty stop string never matches (OpenAI accepts it too)
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
    """Base of every request body: unknown fields and type coercion are refused (integral numbers
    written as 1.0 count as integers, as in JSON Schema)."""

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


# ---------------------------------------------------------------- native generate
class GenerateRequest(StrictRequest):

    model: ModelId = None
    prompt: Text = Field(description="text to continue (a BOS token is prepended)")
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate; prompt + these must fit the context")
    temperature: Temperature = 1.0
    top_k: TopK | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop strings (cut from the text)")
    stream: bool = Field(False, description="server-sent events, one per token batch")
    return_routing: bool = Field(False, description="per-token per-layer operator, entropy and MetaRouter gate")
    ignore_eos: bool = Field(False, description="keep generating past the EOS token")
    return_logprobs: bool = Field(False, description="natural-log probability of every token (prompt and generated) "
                                  "under the model's raw distribution (before temperature / top-k / top-p)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return _stop_list(v)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens taken from the prefix cache instead of computed")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(None, description="as OpenAI reports it: the cached prompt tokens")

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class Timing(BaseModel):
    queue_seconds: float
    time_to_first_token_seconds: float | None
    total_seconds: float


class Flops(BaseModel):
    executed: float = Field(description="FLOPs this request's share of the forwards executed")
    dense: float = Field(description="what the full-attention baseline of equal size would spend")
    ratio: float


class Routing(BaseModel):
    operator_names: list[str]
    tokens: list[str] = Field(description="token pieces that went through the model (prompt with BOS, then generated)")
    token_ids: list[int]
    prompt_tokens: int
    operator: list[list[int]] = Field(description="[token][layer] operator id (index into operator_names)")
    entropy: list[list[float | None]] = Field(description="[token][layer] spectral entropy (null where not computed)")
    gate: list[float | None] = Field(description="MetaRouter gate per token (null without MetaRouter)")
    thresholds: list[list[float]] = Field(
        default_factory=list,
        description="[layer] entropy cut points of the layer's router: [] where the layer does not route (layer 1, "
                    "layer L, the baseline), [tau] for the two-operator router (entropy >= tau -> attention, else DCT), "
                    "[p33, p67] for the three-operator one (below p33 DCT, up to p67 RBF, above attention)")


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: Literal["length", "stop", "eos"]
    usage: Usage
    timing: Timing
    flops: Flops
    routing: Routing | None = None
    logprobs: list[float | None] | None = Field(
        None, description="with return_logprobs: log-probability of each token, prompt (BOS first, null: it is never "
                          "predicted) then generated, i.e. usage.total_tokens entries; routing.tokens is this order "
                          "less the last generated token, which the model never processed")


# ---------------------------------------------------------------- perplexity
class PerplexityRequest(StrictRequest):

    model: ModelId = None
    text: str | list[str] = Field(description="one text or a list of texts")
    stride: int | None = Field(None, ge=1, description="sliding-window stride in tokens (default: half the context)")
    return_logprobs: bool = Field(False, description="per-token log-probabilities")
    return_routing: bool = Field(False, description="per-token per-layer operator, entropy and MetaRouter gate "
                                 "(`token_routing` of each result)")

    @field_validator("text")
    @classmethod
    def _text(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be an empty list")
            for i, item in enumerate(v):
                try:
                    utf8_text(item)
                except ValueError as exc:
                    raise ValueError(f"item {i} {exc}") from None
            return v
        return utf8_text(v)


class RoutingCounts(BaseModel):
    operator_names: list[str]
    per_layer: list[list[int]] = Field(description="[layer][operator] tokens, each input position counted once")
    attention_share: float | None = Field(description="share of routing-layer tokens sent to attention")


class TokenLogprob(BaseModel):
    token: str
    id: int
    logprob: float


class PerplexityResult(BaseModel):
    index: int
    tokens: int = Field(description="predicted tokens (the text's tokens; BOS is context only)")
    words: int
    bytes: int
    nll: float = Field(description="summed negative log-likelihood (nats)")
    mean_nll: float
    perplexity: float
    word_perplexity: float | None
    bits_per_byte: float | None
    windows: int
    logprobs: list[TokenLogprob] | None = None
    routing: RoutingCounts
    flops: Flops = Field(description="the forwards of this text's windows (overlapping windows recompute their shared context)")
    token_routing: Routing | None = Field(
        None, description="with return_routing: routing of each input position (BOS, then every token but the last, "
                          "which is only ever predicted), taken from the window that scores the next token")


class PerplexityResponse(BaseModel):
    model: str
    window: int
    stride: int
    results: list[PerplexityResult]
    usage: Usage
    timing: Timing


# ---------------------------------------------------------------- tokenize
class TokenizeRequest(StrictRequest):

    model: ModelId = None
    text: AnyText
    add_bos: bool = True


class TokenizeResponse(BaseModel):
    token_ids: list[int]
    tokens: list[str]
    count: int
    max_context: int


# ---------------------------------------------------------------- OpenAI completions
class StreamOptions(BaseModel):
    """`stream_options` of /v1/completions and /v1/chat/completions (the one definition of both).

    OpenAI's `include_usage` and vLLM's `continuous_usage_stats` (load generators such as guidellm send
    it); other keys are ignored like unknown request fields, so a client's newer option never fails a run.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = Field(False, description="a last chunk with `choices: []` carries the request's usage; "
                                "every other chunk has `usage: null`")
    continuous_usage_stats: bool = Field(False, description="vLLM's extension, with include_usage: every chunk carries "
                                         "the usage of its choice so far (prompt tokens and tokens generated up to it)")


class CompletionRequest(StrictRequest):
    """OpenAI /v1/completions; unknown fields are ignored, unsupported ones rejected."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: ModelId = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM's extension: keep generating past EOS (load generators such as "
                             "guidellm send it to get exactly max_tokens)")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return _stop_list(v)

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _long_id_list(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """A long list of ids is checked as ids only: the union would also try it as texts and lists of ids,
        building an error per item for each (60 ms of the event loop for a 1 MiB body)."""
        if not (isinstance(value, list) and len(value) > LONG_LIST and type(value[0]) is int):
            return handler(value)
        try:
            return _TOKEN_IDS.validate_python(value)
        except ValidationError as exc:
            index = exc.errors()[0]["loc"][0]
            raise ValueError(f"item {index} is {value[index]!r}, not a token id (an integer)") from None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0, 0.0):
            raise ValueError("is not supported (only 0)")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("is not supported (only 1)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("is not supported")
        return v


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chiar"
    max_model_len: int
    arch: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
