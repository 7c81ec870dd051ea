"""Parallel sampling: ``best_of`` independent sequences per request, the best ``n`` returned.

The prompt is computed once; at the first sample the engine forks
``best_of - 1`` children that share its KV blocks, and each sequence samples
its own first token from the prompt's logits row with its own generator
(``seed + index``). From then on every sequence follows the standard stop
rules on its own. With ``best_of > n`` the ``n`` sequences of highest
cumulative logprob are returned, best first (vLLM); otherwise all ``n`` in
index order. n = 1 is plain sampling.
"""

from __future__ import annotations

from framework.interfaces import DecodingStrategy, SequenceOps
from framework.sampling_params import SamplingParams


class ParallelSampling(DecodingStrategy):
    """n / best_of sampling (the default strategy)."""

    name = "parallel"
    supports_async_scheduling = True  # step() only appends

    def __init__(self, params: SamplingParams, ops: SequenceOps):
        super().__init__(params, ops)
        self.fanout = self.max_width = params.best_of

    def step(self, samples: list) -> None:
        for sample in samples:
            self.ops.append(sample.seq, sample.token_id, sample.logprob, sample=sample)

    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.ops.seqs)

    def outputs(self) -> list:
        seqs = self.ops.seqs
        if self.params.best_of == self.params.n:
            return sorted(seqs, key=lambda s: s.index)
        return sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: self.params.n]
