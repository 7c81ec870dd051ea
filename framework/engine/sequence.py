"""A sequence: the unit the model runs on and the KV cache holds (one or more per request)."""

from __future__ import annotations

import copy
import enum
import itertools
from typing import TYPE_CHECKING, Optional

from framework.outputs import Logprob

if TYPE_CHECKING:
    import torch

    from framework.engine.sequence_group import SequenceGroup
    from framework.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted by swap: block_ids are CPU block ids, num_computed_tokens kept
    FINISHED = "finished"


class Sequence:
    """Token state of one generated sequence.

    Invariants (there are no prefill/decode phases):
      * ``token_ids`` = prompt tokens + generated tokens;
      * ``num_computed_tokens`` of them have K/V in the cache, held in
        ``block_ids``; between steps ``len(block_ids) ==
        ceil(num_computed_tokens / block_size)`` (with async scheduling, up
        to one block more: the next step's, taken before this one is
        applied);
      * a live sequence always has at least one token to compute (its
        prompt, or the token sampled last step); a step schedules
        ``num_tokens - num_computed_tokens`` (or a chunk of it), and when it
        reaches the end a new token is sampled and appended.
    Forked sequences (parallel sampling, beam search) share blocks with
    their parent through the block pool's reference counts.
    Preemption by recompute frees the blocks and sets ``num_computed_tokens``
    to 0: the prompt and the tokens generated so far are prefilled again
    (from the prefix cache, when enabled, as far as it still holds them).
    Preemption by swap keeps ``num_computed_tokens`` and moves the blocks to
    the CPU pool (``block_ids`` then name CPU blocks) until it resumes.

    Prefix caching: ``block_hashes[j]`` names full block j of ``token_ids``
    (a function of the tokens only, so it survives preemption and is copied
    to forks); the first ``num_cached_blocks`` of ``block_ids`` are already
    registered in the prefix cache (or found there).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: "SamplingParams",
        generator: "Optional[torch.Generator]" = None,
        index: int = 0,
    ):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # position among the request's sequences (parallel sampling)
        self.group: "Optional[SequenceGroup]" = None
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_cached_blocks = 0
        # output state
        self.output_text = ""
        self.cumulative_logprob = 0.0
        self.logprobs: Optional[list[dict[int, Logprob]]] = [] if params.logprobs is not None else None
        self.finish_reason: Optional[str] = None
        self.stop_reason: int | str | None = None

    def fork(self) -> "Sequence":
        """A copy with a new id and no KV blocks (the caller shares or allocates them)."""
        child = copy.copy(self)
        child.seq_id = next(_ids)
        child.token_ids = list(self.token_ids)
        child.block_hashes = list(self.block_hashes)
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        child.block_ids = []
        child.num_cached_blocks = 0
        return child

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
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, index={self.index}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)}, {self.status.value})"
        )
