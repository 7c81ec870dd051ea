"""After a step: append sampled tokens, detokenize, check stop conditions, build outputs."""

from __future__ import annotations

import time
from typing import Any, Optional

from framework.engine.sequence import Sequence, SequenceStatus
from framework.engine.sequence_group import SequenceGroup
from framework.engine.step_results import PromptEntry, SampledToken
from framework.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from framework.tokenizer import IncrementalDetokenizer


class OutputProcessor:
    """Owns each sequence's detokenizer; applies the stop rules in vLLM's order.

    Stop rules, checked after each new token (``append(check_stop=True)``):
      1. EOS (from generation_config.json) unless ``ignore_eos``: finish "stop";
      2. a ``stop_token_ids`` entry: "stop", ``stop_reason`` = the id;
      3. a stop string in the new text: "stop", text cut before it (or after
         it with ``include_stop_str_in_output``), ``stop_reason`` = the string;
      4. ``max_tokens`` generated, or the sequence reached ``max_model_len``:
         "length".
    Sequences appended without stop checks (beam search) are not
    detokenized incrementally; their strategy decodes them when needed.
    """

    def __init__(self, tokenizer: Any, eos_token_ids: list[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self._detok: dict[int, IncrementalDetokenizer] = {}

    def drop(self, seq: Sequence) -> None:
        self._detok.pop(seq.seq_id, None)

    def append(
        self, seq: Sequence, token: int, logprob: float, sample: Optional[SampledToken] = None, check_stop: bool = True
    ) -> None:
        """Append one token to ``seq``; with ``check_stop``, detokenize and apply the stop rules."""
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob_entry(seq, token, logprob, sample))
        if check_stop:
            self._check_stop(seq, token)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if not params.ignore_eos and token in self.eos_token_ids:
            self.finish(seq, "stop", None)  # EOS ends the text; it is never shown
        else:
            detok = self._detok.get(seq.seq_id)
            if detok is None:  # first token of this sequence (forks included)
                detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.skip_special_tokens)
                self._detok[seq.seq_id] = detok
            delta = detok.add(token)
            if token in params.stop_token_ids:
                seq.output_text += delta  # kept unless special, as in vLLM
                self.finish(seq, "stop", token)
            elif delta:
                self._append_text(seq, delta)
        if seq.finish_reason is None:
            if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
                self.finish(seq, "length", None)
            elif seq.num_tokens >= self.max_model_len:
                self.finish(seq, "length", None)

    def _append_text(self, seq: Sequence, delta: str) -> None:
        stops = seq.params.stop_strings
        if not stops:
            seq.output_text += delta
            return
        # Only the tail can hold a new match: the delta plus the longest stop's overlap.
        before = len(seq.output_text)
        text = seq.output_text + delta
        search_from = max(0, before - max(len(s) for s in stops) + 1)
        hits = [(text.find(s, search_from), s) for s in stops]
        hits = [(i, s) for i, s in hits if i != -1]
        if not hits:
            seq.output_text = text
            return
        index, stop = min(hits)
        end = index + len(stop) if seq.params.include_stop_str_in_output else index
        seq.output_text = text[:end]
        self.finish(seq, "stop", stop)

    def _logprob_entry(self, seq: Sequence, token: int, logprob: float, sample: Optional[SampledToken]):
        """The sampled token and the request's top ``logprobs`` entries of its row."""
        top = (sample.top or []) if sample is not None else []
        entry = {}
        for rank, (token_id, value) in enumerate(top[: seq.params.logprobs], start=1):
            entry[token_id] = Logprob(value, rank, self._piece(token_id))
        rank = sample.rank if sample is not None and sample.token_id == token else None
        if rank is None:  # a token other than the row's sample (beam search): its rank among the top
            rank = next((i for i, (t, _) in enumerate(top, start=1) if t == token), None)
        entry[token] = Logprob(logprob, rank, self._piece(token))
        return entry

    def prompt_logprobs(self, group: SequenceGroup, entries: list[PromptEntry]) -> None:
        """Append the entries of the next prompt positions to the request's ``prompt_logprobs``."""
        for token, logprob, rank, top in entries:
            entry = {t: Logprob(lp, r, self._piece(t)) for r, (t, lp) in enumerate(top, start=1)}
            entry[token] = Logprob(logprob, rank, self._piece(token))
            group.prompt_logprobs.append(entry)

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def decode(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens)

    def finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.status = SequenceStatus.FINISHED
        self.drop(seq)

    def abort(self, group: SequenceGroup) -> None:
        for seq in group.live_seqs():
            self.finish(seq, "abort", None)
        group.finished_time = time.monotonic()

    def request_output(self, group: SequenceGroup) -> RequestOutput:
        finished = group.is_finished() or all(s.is_finished for s in group.seqs)
        completions = [
            CompletionOutput(
                index=i,
                text=seq.output_text,
                token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=seq.logprobs,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for i, seq in enumerate(group.strategy.outputs())
        ]
        metrics = RequestMetrics(
            group.arrival_time, group.first_scheduled_time, group.first_token_time, group.finished_time
        )
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=metrics,
            prompt_logprobs=group.prompt_logprobs,
        )
