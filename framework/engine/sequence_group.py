"""A request: its sequences, its parameters and its decoding strategy (no torch)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

from framework.engine.sequence import Sequence, SequenceStatus
from framework.outputs import Logprob

if TYPE_CHECKING:
    from framework.sampling_params import SamplingParams


class SequenceGroup:
    """The sequences of one request; the unit the scheduler admits and preempts.

    Invariants:
      * before its first sample a request has exactly one sequence: the
        prompt is computed once. At the step that samples it, the scheduler
        forks ``fanout - 1`` children that share the prompt's blocks
        (``forked`` becomes True); all of them sample from the prompt's
        last logits row;
      * ``seqs`` holds the sequences the strategy keeps, in its order: live
        ones (waiting/running, holding KV blocks) and, for parallel
        sampling, finished ones (blocks already freed);
      * all live sequences of a request sample in the same step (see
        ``Scheduler``), so a strategy sees the whole request each step.
    """

    def __init__(
        self,
        request_id: str,
        prompt: Optional[str],
        prompt_token_ids: list[int],
        params: "SamplingParams",
        arrival_time: Optional[float] = None,
        generators: Optional[list[Any]] = None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # generators[i]: the torch.Generator of sequence i (seed + i), or None
        self.generators = generators or []
        first = Sequence(request_id, prompt_token_ids, params, self._generator(0), index=0)
        first.group = self
        self.seqs: list[Sequence] = [first]
        self.strategy: Any = None  # a framework.interfaces.DecodingStrategy, set by the engine
        self.fanout = 1
        self.max_width = 1
        self.num_top_logprobs = 0  # top logprobs each row needs: the request's and the strategy's
        self.uses_processed_logprobs = False
        self.forked = False
        self.sampled = False  # some token was sampled already
        # prompt_logprobs[i]: entry of prompt token i (None for the first); filled while the prompt is computed
        self.prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None

    def attach(self, strategy: Any) -> None:
        """Take the strategy and the sizes the scheduler and the sampler need from it."""
        self.strategy = strategy
        self.fanout = max(1, int(strategy.fanout))
        self.max_width = max(self.fanout, int(strategy.max_width))
        self.num_top_logprobs = max(self.params.logprobs or 0, int(strategy.num_top_logprobs))
        self.uses_processed_logprobs = bool(strategy.uses_processed_logprobs)

    def _generator(self, index: int) -> Any:
        return self.generators[index] if index < len(self.generators) else None

    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if s.status is not SequenceStatus.FINISHED]

    def num_live_seqs(self) -> int:
        return sum(s.status is not SequenceStatus.FINISHED for s in self.seqs)

    def max_num_running_seqs(self) -> int:
        """Sequences to count against ``max_num_seqs``: the strategy's width until the first sample."""
        live = self.num_live_seqs()
        return live if self.sampled else max(live, self.max_width)

    def fork_children(self) -> list[Sequence]:
        """Children 1..fanout-1 of the single sequence (token state only; the caller shares the blocks)."""
        parent = self.seqs[0]
        children = []
        for index in range(1, self.fanout):
            child = parent.fork()
            child.index = index
            child.generator = self._generator(index)
            children.append(child)
        self.seqs.extend(children)
        self.forked = True
        return children

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    def is_finished(self) -> bool:
        return self.strategy.is_finished()

    def __repr__(self) -> str:
        return f"SequenceGroup({self.request_id!r}, seqs={len(self.seqs)}, live={len(self.live_seqs())})"
