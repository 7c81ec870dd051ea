"""Request and response bodies of the OpenAI-compatible server (OpenAI's wire format).

Requests accept unknown fields, as OpenAI clients send extras; a known
parameter the engine does not support yet is rejected (400 naming it) by
``sampling.py``, never ignored. Range checks live in ``SamplingParams``
(one source of truth); the bounds here only keep values representable
(e.g. a ``top_k`` or ``seed`` that fits in 64 bits) and finite.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128  # most choices per prompt (n, best_of), as OpenAI
MAX_LOGPROBS = 20  # most top logprobs per token, as vLLM
_INT32 = 2**31 - 1
# A token id as a request may carry it; the vocabulary bound is checked by the engine.
TokenId = Annotated[int, Field(ge=0, le=_INT32)]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, protected_namespaces=())


class ResponseModel(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


# -- requests ---------------------------------------------------------------------


class StreamOptions(RequestModel):
    include_usage: bool = False


class SamplingFields(RequestModel):
    """Decoding fields shared by every generation endpoint (SamplingParams names)."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = Field(None, ge=-1, le=_INT32)
    min_p: Optional[float] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[TokenId]] = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0
    cache_salt: Optional[str] = Field(None, description="prefix caching: share cached KV blocks only with this salt")


class SamplingRequest(SamplingFields):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = Field(None, description="a served model name (default: the first)")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]] = Field(
        ..., description="a string, a list of strings, token ids, or a list of token id lists"
    )
    max_tokens: Optional[int] = 16
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None


class TextPart(RequestModel):
    type: str = Field(..., description='"text" (other part types are not supported)')
    text: Optional[str] = None


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, description="deprecated by OpenAI: use max_completion_tokens")
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    response_format: Optional[dict[str, Any]] = None


class GenerateRequest(SamplingFields):
    """The simple API of vLLM's old api_server: a prompt and SamplingParams fields."""

    prompt: Union[str, list[TokenId]]
    stream: bool = False
    max_tokens: Optional[int] = 16
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(RequestModel):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestModel):
    model: Optional[str] = None
    tokens: list[TokenId]


# -- responses ----------------------------------------------------------------------


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "framework"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class CompletionResponse(ResponseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(ResponseModel):
    content: Optional[list[ChatLogprob]] = None


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(ResponseModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatStreamChoice(ResponseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


class GenerateResponse(ResponseModel):
    text: list[str] = Field(..., description="prompt + completion, one per output")


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[TokenId]


class DetokenizeResponse(ResponseModel):
    prompt: str


class VersionResponse(ResponseModel):
    version: str
