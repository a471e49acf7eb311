"""Request and response models of the vLLM-style tokenizer protocol: /tokenize, /detokenize and
/tokenizer_info (what lm-eval's remote tokenizer calls). JSON Schema types, unknown fields refused."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from server.openai_schemas import ChatMessage
from server.sampling_params import NUMBER
from server.schemas import AnyText, ModelId

FORBID = ConfigDict(extra="forbid")
TokenId = Annotated[int, Field(ge=0), NUMBER]


class TokenizeCompletion(BaseModel):
    """Text to ids: special-token strings map to their ids (as in vLLM / HF); add_special_tokens prepends BOS."""

    model_config = FORBID
    model: ModelId = None
    prompt: AnyText
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChat(BaseModel):
    """Chat messages rendered with the chat template, then tokenized like /v1/chat/completions does."""

    model_config = FORBID
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
    model_config = FORBID
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
