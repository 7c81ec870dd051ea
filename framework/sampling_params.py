"""``SamplingParams``: how to decode one request (vLLM's names, defaults and checks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

_GREEDY_EPS = 1e-5
# The default cap on ``logprobs`` / ``prompt_logprobs``; the engine's
# ``max_logprobs`` setting is the limit that applies (checked at add_request).
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values


@dataclass
class SamplingParams:
    """Decoding settings of one request.

    Every invalid value raises ``ValueError`` naming the field and its limit.
    The field order and defaults are vLLM's.

    Attributes:
        n: sequences to return.
        best_of: sequences to generate (default ``n``); the ``n`` with the
            highest cumulative logprob are returned. With beam search it is
            the beam width.
        presence_penalty: subtracted from the logit of every token that
            occurs in the generated text; in [-2, 2].
        frequency_penalty: subtracted once per occurrence in the generated
            text; in [-2, 2].
        repetition_penalty: tokens of the prompt or the generated text get
            their logit divided (positive) or multiplied (negative) by it,
            as transformers' ``RepetitionPenaltyLogitsProcessor``; > 0, 1 is off.
        temperature: 0 is greedy; higher flattens the distribution.
        top_p: nucleus sampling mass in (0, 1]; 1 is off.
        top_k: keep the k most likely tokens; -1 or 0 is off.
        min_p: drop tokens below ``min_p`` times the top probability; 0 is off.
        seed: per-request seed; the same seed gives the same output whatever
            else is in the batch (sequence i of a request uses ``seed + i``).
        use_beam_search: beam search of width ``best_of`` (vLLM's old API);
            needs temperature 0.
        length_penalty: beam search ranks finished beams by
            ``sum_logprobs / generated_len ** length_penalty``.
        early_stopping: beam search stop rule, as transformers: True (stop
            when ``best_of`` beams are finished), False (stop when no running
            beam can beat them, judged at the current length) or "never"
            (judged at the longest possible length).
        stop: strings that end generation (not included in the output).
        stop_token_ids: token ids that end generation (included in token_ids).
        include_stop_str_in_output: keep the matched stop string in the text.
        ignore_eos: keep generating after EOS.
        max_tokens: most tokens to generate (None: up to max_model_len).
        min_tokens: EOS and ``stop_token_ids`` cannot be sampled before this
            many tokens are generated.
        logprobs: number of top log-probabilities to return per generated
            token, besides the sampled token's (None: none; 0: sampled only).
        prompt_logprobs: the same for every prompt token (the first gets None).
        skip_special_tokens: drop special tokens from the text.
        logit_bias: ``{token_id: bias}`` added to the logits, in [-100, 100].
        sampler: name of the token sampler (``register_samplers``) that
            samples this request's rows.
        strategy: name of the decoding strategy; default "beam_search" with
            ``use_beam_search``, else "parallel" (n / best_of sampling).
        cache_salt: with prefix caching, requests share cached KV blocks only
            with requests of the same salt (None: the unsalted pool). It goes
            into the hash of the first block, so one tenant cannot probe
            another's cached prompts through timing. vLLM carries it on the
            request; here it is a sampling field, so it reaches every API.
    """

    n: int = 1
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Optional[int] = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    logit_bias: Optional[dict[int, float]] = None
    sampler: str = "standard"
    strategy: Optional[str] = None
    cache_salt: Optional[str] = None
    _stop_strings: list[str] = field(default_factory=list, init=False, repr=False)
    # Derived at construction: any of min_tokens, logit_bias or a penalty (the sampler's fast path skips the rest).
    _processes_logits: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self._stop_strings = [self.stop]
        else:
            self._stop_strings = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.best_of is None:
            self.best_of = self.n
        self.logit_bias = _token_dict(self.logit_bias)
        self.validate()
        if self.temperature < _GREEDY_EPS:
            # Greedy: the filters are meaningless; normalise so the sampler can skip them.
            self.top_p, self.top_k, self.min_p = 1.0, -1, 0.0
        self._processes_logits = bool(self.min_tokens or self.logit_bias or self.has_penalties)

    def validate(self) -> None:
        self._validate_counts()
        self._validate_sampling()
        self._validate_penalties()
        if self.use_beam_search:
            self._validate_beam_search()
        else:
            self._validate_no_beam_search()

    def _validate_counts(self) -> None:
        self._check_int("n", 1)
        self._check_int("best_of", self.n, f"n={self.n}")
        if self.max_tokens is not None:
            self._check_int("max_tokens", 1)
        self._check_int("min_tokens", 0)
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens, "min_tokens",
                f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}",
            )  # fmt: skip
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                self._check_int(name, 0)
        _check(all(isinstance(s, str) and s for s in self._stop_strings), "stop", "must be non-empty strings")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0")
        if self.seed is not None:
            _check(_is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        if self.cache_salt is not None:
            _check(
                isinstance(self.cache_salt, str) and self.cache_salt != "", "cache_salt",
                f"must be a non-empty string, got {self.cache_salt!r}",
            )  # fmt: skip

    def _check_int(self, name: str, minimum: int, minimum_text: Optional[str] = None) -> None:
        value = getattr(self, name)
        _check(_is_int(value) and value >= minimum, name, f"must be >= {minimum_text or minimum}, got {value!r}")

    def _validate_sampling(self) -> None:
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, "top_k", f"must be -1 (off), 0 (off) or >= 1, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")

    def _validate_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, name, f"must be in [-2, 2], got {value}")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for token, bias in self.logit_bias.items():
            _check(token >= 0, "logit_bias", f"keys must be token ids >= 0, got {token}")
            _check(
                -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS, "logit_bias",
                f"values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias} for token {token}",
            )  # fmt: skip

    def _validate_beam_search(self) -> None:
        width = self.best_of
        _check(width > 1, "best_of", f"must be > 1 with use_beam_search (it is the beam width), got {width}")
        _check(self.temperature < _GREEDY_EPS, "temperature", f"must be 0 with use_beam_search, got {self.temperature}")
        _check(self.top_p >= 1.0 - _GREEDY_EPS, "top_p", f"must be 1 with use_beam_search, got {self.top_p}")
        _check(self.top_k in (-1, 0), "top_k", f"must be -1 (off) with use_beam_search, got {self.top_k}")
        _check(self.min_p <= 0.0, "min_p", f"must be 0 with use_beam_search, got {self.min_p}")
        early = self.early_stopping
        _check(
            early is True or early is False or early == "never", "early_stopping",
            f"must be True, False or 'never', got {early!r}",
        )  # fmt: skip
        if self.strategy is not None:
            _check(
                self.strategy == "beam_search", "strategy",
                f"must be 'beam_search' or unset with use_beam_search, got {self.strategy!r}",
            )  # fmt: skip

    def _validate_no_beam_search(self) -> None:
        _check(
            self.early_stopping is False, "early_stopping",
            f"must be False without use_beam_search (it has no effect), got {self.early_stopping!r}",
        )  # fmt: skip
        _check(
            abs(self.length_penalty - 1.0) < _GREEDY_EPS, "length_penalty",
            f"must be 1.0 without use_beam_search (it has no effect), got {self.length_penalty}",
        )  # fmt: skip
        if self.temperature < _GREEDY_EPS and self.strategy is None:
            name = "n" if self.n > 1 else "best_of"
            value = getattr(self, name)
            _check(value == 1, name, f"must be 1 for greedy sampling (temperature 0), got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_strings

    @property
    def strategy_name(self) -> str:
        """The decoding strategy that runs this request."""
        if self.strategy is not None:
            return self.strategy
        return "beam_search" if self.use_beam_search else "parallel"

    @property
    def processes_logits(self) -> bool:
        """Whether min_tokens, logit_bias or a penalty applies (fixed at construction)."""
        return self._processes_logits

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_dict(bias) -> dict[int, float]:
    """``logit_bias`` with integer keys (JSON gives strings: ``{"50256": -100}``)."""
    if not bias:
        return {}
    if not isinstance(bias, dict):
        raise ValueError(f"SamplingParams.logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = float(value)
        except (TypeError, ValueError):
            message = f"must map token ids to numbers, got {key!r}: {value!r}"
            raise ValueError(f"SamplingParams.logit_bias {message}") from None
    return out


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} {message}")
