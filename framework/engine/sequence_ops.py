"""``GroupOps``: the engine's side of ``framework.interfaces.SequenceOps`` for one request."""

from __future__ import annotations

from typing import Optional

from framework.engine.block_pool import KVCacheManager
from framework.engine.output_processor import OutputProcessor
from framework.engine.sequence import Sequence, SequenceStatus
from framework.engine.sequence_group import SequenceGroup
from framework.engine.step_results import SampledToken


class GroupOps:
    """What a decoding strategy may do to its request's sequences.

    Invariant: a sequence holds KV blocks exactly while it is live (waiting
    or running) and in ``group.seqs``; every path that finishes or drops a
    sequence frees its blocks here.
    """

    def __init__(self, group: SequenceGroup, kv: KVCacheManager, outputs: OutputProcessor, max_model_len: int):
        self.group = group
        self.kv = kv
        self.outputs = outputs
        params = group.params
        eos = set() if params.ignore_eos else set(outputs.eos_token_ids)
        self.stop_token_ids = frozenset(eos | set(params.stop_token_ids))
        room = max_model_len - len(group.prompt_token_ids)
        self.max_output_tokens = room if params.max_tokens is None else min(params.max_tokens, room)

    @property
    def seqs(self) -> list[Sequence]:
        return self.group.seqs

    def fork(self, seq: Sequence) -> Sequence:
        child = seq.fork()
        self.kv.fork(seq, child)
        self.group.seqs.append(child)
        return child

    def copy(self, seq: Sequence) -> Sequence:
        detached = seq.fork()
        detached.status = SequenceStatus.FINISHED  # never scheduled
        return detached

    def keep(self, seqs: list[Sequence]) -> None:
        kept = {id(s) for s in seqs}
        for seq in self.group.seqs:
            if id(seq) not in kept:
                self._release(seq)
        self.group.seqs = list(seqs)

    def append(
        self, seq: Sequence, token_id: int, logprob: float, sample: Optional[SampledToken] = None, check_stop=True
    ) -> None:
        self.outputs.append(seq, token_id, logprob, sample, check_stop)
        if seq.is_finished:
            self.kv.free(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        self.outputs.finish(seq, reason, stop_reason)
        self.kv.free(seq)

    def decode(self, seq: Sequence) -> str:
        return self.outputs.decode(seq)

    def _release(self, seq: Sequence) -> None:
        self.kv.free(seq)
        self.outputs.drop(seq)
        if not seq.is_finished:
            seq.status = SequenceStatus.FINISHED
