"""After a step: append sampled tokens, detokenize, check stop conditions, build outputs."""

from __future__ import annotations

import time
from typing import Any

from framework.engine.model_runner import SampledToken
from framework.engine.sequence import Sequence, SequenceStatus
from framework.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from framework.tokenizer import IncrementalDetokenizer


class OutputProcessor:
    """Owns each sequence's detokenizer; applies the stop rules in vLLM's order.

    Stop rules, checked after each new token:
      1. EOS (from generation_config.json) unless ``ignore_eos``: finish "stop";
      2. a ``stop_token_ids`` entry: "stop", ``stop_reason`` = the id;
      3. a stop string in the new text: "stop", text cut before it (or after
         it with ``include_stop_str_in_output``), ``stop_reason`` = the string;
      4. ``max_tokens`` generated, or the sequence reached ``max_model_len``:
         "length".
    """

    def __init__(self, tokenizer: Any, eos_token_ids: list[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self._detok: dict[int, IncrementalDetokenizer] = {}

    def add(self, seq: Sequence) -> None:
        self._detok[seq.seq_id] = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, seq.params.skip_special_tokens
        )

    def drop(self, seq: Sequence) -> None:
        self._detok.pop(seq.seq_id, None)

    def append(self, sample: SampledToken) -> None:
        """Apply one sampled token to its sequence (may finish it)."""
        seq, token = sample.seq, sample.token_id
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.token_ids.append(token)
        seq.cumulative_logprob += sample.logprob
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob_entry(sample))
        params = seq.params
        if not params.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, "stop", None)  # EOS ends the text; it is never shown
        else:
            delta = self._detok[seq.seq_id].add(token)
            if token in params.stop_token_ids:
                seq.output_text += delta  # kept unless special, as in vLLM
                self._finish(seq, "stop", token)
            elif delta:
                self._append_text(seq, delta)
        if seq.finish_reason is None:
            if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
                self._finish(seq, "length", None)
            elif seq.num_tokens >= self.max_model_len:
                self._finish(seq, "length", None)

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
        self._finish(seq, "stop", stop)

    def _logprob_entry(self, sample: SampledToken) -> dict[int, Logprob]:
        entry = {}
        for rank, (token_id, logprob) in enumerate(sample.top or [], start=1):
            entry[token_id] = Logprob(logprob, rank, self._piece(token_id))
        entry[sample.token_id] = Logprob(sample.logprob, sample.rank, self._piece(sample.token_id))
        return entry

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.status = SequenceStatus.FINISHED
        seq.finished_time = time.monotonic()

    @staticmethod
    def abort(seq: Sequence) -> None:
        OutputProcessor._finish(seq, "abort", None)

    @staticmethod
    def request_output(seq: Sequence) -> RequestOutput:
        completion = CompletionOutput(
            index=0,
            text=seq.output_text,
            token_ids=seq.output_token_ids,
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=seq.logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        metrics = RequestMetrics(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time, seq.finished_time)
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[completion],
            finished=seq.is_finished,
            metrics=metrics,
        )
