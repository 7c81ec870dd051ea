"""``SamplingParams``: how to decode one request (vLLM's names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Decoding settings of one request.

    Every invalid value raises ``ValueError`` naming the field and its limit.

    Attributes:
        temperature: 0 is greedy; higher flattens the distribution.
        top_p: nucleus sampling mass in (0, 1]; 1 is off.
        top_k: keep the k most likely tokens; 0 or -1 is off.
        min_p: drop tokens below ``min_p`` times the top probability; 0 is off.
        seed: per-request seed; the same seed gives the same output whatever
            else is in the batch.
        max_tokens: most tokens to generate (None: up to max_model_len).
        stop: strings that end generation (not included in the output).
        stop_token_ids: token ids that end generation (included in token_ids).
        include_stop_str_in_output: keep the matched stop string in the text.
        ignore_eos: keep generating after EOS.
        logprobs: number of top log-probabilities to return per generated
            token, besides the sampled token's (None: none; 0: sampled only).
        skip_special_tokens: drop special tokens from the text.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    _stop_strings: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self._stop_strings = [self.stop]
        else:
            self._stop_strings = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        self.validate()
        if self.temperature < _GREEDY_EPS:
            # Greedy: the filters are meaningless; normalise so the sampler can skip them.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def validate(self) -> None:
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k == -1 or self.top_k >= 0, "top_k", f"must be -1 (off), 0 (off) or >= 1, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None:
            _check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None:
            _check(
                0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"
            )
        _check(all(isinstance(s, str) and s for s in self._stop_strings), "stop", "must be non-empty strings")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0")
        if self.seed is not None:
            _check(isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_strings


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} {message}")
