"""A sequence: the unit the scheduler schedules (one per request for now)."""

from __future__ import annotations

import enum
import itertools
import time
from typing import TYPE_CHECKING, Optional

from framework.outputs import Logprob

if TYPE_CHECKING:
    import torch

    from framework.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token state of one generated sequence.

    Invariants (there are no prefill/decode phases):
      * ``token_ids`` = prompt tokens + generated tokens;
      * ``num_computed_tokens`` of them have K/V in the cache, held in
        ``block_ids`` (``ceil(num_computed_tokens / block_size) <=
        len(block_ids)``);
      * a step schedules ``num_tokens - num_computed_tokens`` (or a chunk of
        it); when it reaches the end a new token is sampled and appended.
    Preemption by recompute frees the blocks and sets ``num_computed_tokens``
    to 0: the prompt and the tokens generated so far are prefilled again.
    """

    def __init__(
        self,
        request_id: str,
        prompt: Optional[str],
        prompt_token_ids: list[int],
        params: "SamplingParams",
        arrival_time: Optional[float] = None,
        generator: "Optional[torch.Generator]" = None,
    ):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # output state
        self.output_text = ""
        self.cumulative_logprob = 0.0
        self.logprobs: Optional[list[dict[int, Logprob]]] = [] if params.logprobs is not None else None
        self.finish_reason: Optional[str] = None
        self.stop_reason: int | str | None = None
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)}, {self.status.value})"
        )
