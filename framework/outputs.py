"""Result objects, shaped as vLLM's (offline results and stream chunks alike)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Logprob:
    """Log-probability of one token at one position."""

    logprob: float
    rank: Optional[int] = None  # 1 = most likely
    decoded_token: Optional[str] = None


# One dict per generated token: token id -> Logprob (sampled token + top ones).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token: None for the first, then as SampleLogprobs.
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class CompletionOutput:
    """One generated sequence of a request (``index`` 0..n-1; with best_of > n or
    beam search, outputs are ranked best first)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that matched

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) of one request."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass
class RequestOutput:
    """The state of one request after a step (or at the end, offline)."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # n of them once finished
    finished: bool
    metrics: Optional[RequestMetrics] = field(default=None, repr=False)
    prompt_logprobs: Optional[PromptLogprobs] = None  # when SamplingParams.prompt_logprobs is set
