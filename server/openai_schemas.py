"""Request/response models of /v1/chat/completions and the vLLM-style tokenizer endpoints.

Types follow JSON Schema exactly, so the OpenAPI document says what is accepted: no bools as numbers,
no strings as numbers or bools, no 0/1 as bools; an integer may be written 1.0 (JSON Schema calls that
an integer too). Unknown fields in chat requests are ignored like OpenAI's; unsupported ones are
declared (e.g. penalties: only 0) and rejected with a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator

from server.schemas import MAX_STOP, AnyText, ModelId, StreamOptions, Usage, utf8_text

STRICT = ConfigDict(extra="ignore")
STRICT_FORBID = ConfigDict(extra="forbid")


def _json_number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, str):
        raise ValueError("must be a number, not a string")
    return value


# constraints go before the validator: pydantic then writes them as JSON Schema minimum/maximum
_NUMBER = BeforeValidator(_json_number)
Int = Annotated[int, _NUMBER]
Float = Annotated[float, _NUMBER]
Temperature = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False, description="0 = greedy"), _NUMBER]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus mass in (0, 1]"), _NUMBER]
# 2**53 - 1: the largest integer every JSON parser holds exactly
Seed = Annotated[int, Field(ge=0, le=2**53 - 1, description="same seed -> same text; choice j uses seed + j"), _NUMBER]
NewTokens = Annotated[int, Field(ge=1), _NUMBER]
TopK = Annotated[int, Field(ge=1), _NUMBER]
TopLogprobs = Annotated[int, Field(ge=0, le=5), _NUMBER]
ZeroOnly = Annotated[float, Field(ge=0, le=0), _NUMBER]
TokenId = Annotated[int, Field(ge=0), _NUMBER]
StopText = Annotated[str, Field(min_length=1)]
Unsupported = "not supported: only the neutral value is accepted"


# ---------------------------------------------------------------- chat request
class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: AnyText


class ChatMessage(BaseModel):
    """One turn; `content` is text or a list of text parts (other part types are rejected)."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        return utf8_text(v, empty_ok=True) if isinstance(v, str) else v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"] = Field(description="only plain text is supported")


class ChatCompletionRequest(BaseModel):
    """OpenAI /v1/chat/completions."""

    model_config = STRICT

    model: ModelId = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: NewTokens | None = Field(None, description="new tokens at most (default: the rest of the context); "
                                              "the rendered chat + these must fit max_model_len")
    max_tokens: NewTokens | None = Field(None, description="older name of max_completion_tokens (which wins when both are sent)")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK | None = Field(None, description="extension: sample among the k most likely tokens")
    n: Int = Field(1, ge=1, le=8)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = Field(False, description="vLLM's extension: keep generating past EOS (load generators such as "
                                   "guidellm send it to get exactly max_completion_tokens)")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"up to {MAX_STOP} non-empty stop strings (cut from the text)")
    seed: Seed | None = None
    logprobs: StrictBool = False
    top_logprobs: TopLogprobs | None = Field(None, description="alternatives per token (used with logprobs: true)")
    presence_penalty: ZeroOnly | None = Field(None, description=Unsupported)
    frequency_penalty: ZeroOnly | None = Field(None, description=Unsupported)
    logit_bias: dict[str, Float] | None = Field(None, max_length=0, description=Unsupported)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=0, description=Unsupported)
    tool_choice: Literal["none"] | None = Field(None, description=Unsupported)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        items = [] if v is None else [v] if isinstance(v, str) else list(v)
        for item in items:
            utf8_text(item, empty_ok=True)
        return items

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------- chat response
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------- vLLM-style tokenizer endpoints
class TokenizeCompletion(BaseModel):
    """Text to ids: special-token strings map to their ids (as in vLLM / HF); add_special_tokens prepends BOS."""

    model_config = STRICT_FORBID
    model: ModelId = None
    prompt: AnyText
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChat(BaseModel):
    """Chat messages rendered with the chat template, then tokenized like /v1/chat/completions does."""

    model_config = STRICT_FORBID
    model: ModelId = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class VllmTokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = STRICT_FORBID
    model: ModelId = None
    tokens: list[TokenId] = Field(description="token ids, each below the vocabulary size")


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What a remote client needs to tokenize like the server (lm-eval's remote tokenizer reads this)."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    vocab_size: int
    model_max_length: int
    chat_template: str
    add_bos_token: bool = Field(description="the server prepends BOS to every prompt (text prompts and id prompts not "
                                "starting with it); the checkpoint's tokenizer files do the same")
    add_eos_token: bool = Field(description="never: generation ends at EOS, prompts do not")
