"""Beam search, ranked and stopped exactly as transformers' ``generate(num_beams=k)``.

Written against transformers 5.x ``GenerationMixin._beam_search`` (checked
with 5.23). Per step, with k = ``best_of`` live beams (one at the first step,
as transformers gives the other beams -1e9):

1. candidates: each beam's top ``C`` tokens, ``C = max(2, 1 + #stop ids) * k``
   (transformers' ``beams_to_keep``), scored ``beam sum logprob + token
   logprob``; the best ``C`` over all beams, best first;
2. a candidate is finished if its token is EOS / a stop token id, or if it
   reaches the length limit (then every candidate is);
3. finished candidates among the first k become hypotheses, scored
   ``sum_logprobs / generated_len ** length_penalty`` where
   ``generated_len`` counts the generated tokens including the last one and
   never the prompt (transformers >= 4.4x; older versions counted the
   prompt). The best k hypotheses are kept; with ``early_stopping=True`` none
   is added once k are kept;
4. the first k unfinished candidates are the next beams; a beam chosen
   twice is forked (the copies share its KV blocks, copy on write), a beam
   not chosen is freed;
5. the search ends when no candidate is unfinished, or k hypotheses are kept
   and either ``early_stopping is True`` or the best running beam cannot beat
   the worst hypothesis: its score over ``generated_len ** length_penalty``
   at the current length (False; also "never" with ``length_penalty <= 0``)
   or at the longest possible length ("never").

The top ``n`` hypotheses are returned, best first. Logprobs are those of the
processed logits (penalties, bias, ``min_tokens`` applied), which is what the
search ranks. Stop strings do not steer the search; they only cut the text
of the returned hypotheses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from framework.interfaces import DecodingStrategy, SequenceOps
from framework.sampling_params import SamplingParams


@dataclass
class Candidate:
    score: float  # the beam's sum of logprobs including this token
    token_id: int
    logprob: float
    sample: Any  # the SampledToken of the parent beam's row


class BeamSearch(DecodingStrategy):
    """Beam search of width ``best_of`` returning ``n`` hypotheses."""

    name = "beam_search"
    uses_processed_logprobs = True

    def __init__(self, params: SamplingParams, ops: SequenceOps):
        super().__init__(params, ops)
        self.width = params.best_of
        self.fanout = 1
        self.max_width = self.width
        self.num_candidates = max(2, 1 + len(ops.stop_token_ids)) * self.width
        self.num_top_logprobs = self.num_candidates
        self.hypotheses: list[tuple[float, Any]] = []  # (score, detached sequence), best first
        self.done = False

    def step(self, samples: list) -> None:
        gen_len = samples[0].seq.num_output_tokens + 1  # every beam has the same length
        candidates = self._candidates(samples)
        stops, at_limit = self.ops.stop_token_ids, gen_len >= self.ops.max_output_tokens
        finished = [at_limit or c.token_id in stops for c in candidates]
        self._add_hypotheses(candidates[: self.width], finished[: self.width], gen_len)
        running = [c for c, f in zip(candidates, finished) if not f][: self.width]
        if self._search_is_done(running, gen_len):
            self.done = True
            self.ops.keep([])
            for _, hyp in self.hypotheses[: self.params.n]:
                self._set_text(hyp)
        else:
            self._advance(running)

    def _candidates(self, samples: list) -> list[Candidate]:
        out = []
        for sample in samples:
            base = sample.seq.cumulative_logprob
            for token_id, logprob in sample.top[: self.num_candidates]:
                if logprob != float("-inf"):
                    out.append(Candidate(base + logprob, token_id, logprob, sample))
        out.sort(key=lambda c: c.score, reverse=True)  # stable: ties keep beam, then rank order
        return out[: self.num_candidates]

    def _add_hypotheses(self, candidates: list, finished: list, gen_len: int) -> None:
        full = len(self.hypotheses) >= self.width
        if full and self.params.early_stopping is True:
            return
        for cand, done in zip(candidates, finished):
            if not done:
                continue
            hyp = self.ops.copy(cand.sample.seq)
            self.ops.append(hyp, cand.token_id, cand.logprob, sample=cand.sample, check_stop=False)
            if cand.token_id in self.ops.stop_token_ids:
                stop_reason = cand.token_id if cand.token_id in self.params.stop_token_ids else None
                self.ops.finish(hyp, "stop", stop_reason)
            else:
                self.ops.finish(hyp, "length")
            self.hypotheses.append((cand.score / gen_len**self.params.length_penalty, hyp))
        self.hypotheses.sort(key=lambda h: h[0], reverse=True)
        del self.hypotheses[self.width :]

    def _search_is_done(self, running: list[Candidate], gen_len: int) -> bool:
        if not running:
            return True
        if len(self.hypotheses) < self.width:
            return False
        if self.params.early_stopping is True:
            return True
        length_penalty = self.params.length_penalty
        length = gen_len
        if self.params.early_stopping == "never" and length_penalty > 0.0:
            length = self.ops.max_output_tokens
        best_possible = running[0].score / length**length_penalty
        return not best_possible > self.hypotheses[-1][0]

    def _advance(self, running: list[Candidate]) -> None:
        """Make the chosen candidates the live beams: reuse each parent once, fork it for more."""
        claimed: set[int] = set()
        beams = []
        for cand in running:
            parent = cand.sample.seq
            if id(parent) in claimed:
                beams.append(self.ops.fork(parent))  # before any token is appended to parent
            else:
                claimed.add(id(parent))
                beams.append(parent)
        for beam, cand in zip(beams, running):
            self.ops.append(beam, cand.token_id, cand.logprob, sample=cand.sample, check_stop=False)
        self.ops.keep(beams)

    def _set_text(self, hyp: Any) -> None:
        text = self.ops.decode(hyp)
        hits = [(text.find(s), s) for s in self.params.stop_strings if s in text]
        if hits:
            index, stop = min(hits)
            text = text[: index + len(stop)] if self.params.include_stop_str_in_output else text[:index]
            hyp.finish_reason, hyp.stop_reason = "stop", stop
        hyp.output_text = text

    def is_finished(self) -> bool:
        return self.done

    def outputs(self) -> list:
        if self.done:
            return [hyp for _, hyp in self.hypotheses[: self.params.n]]
        beams = self.ops.seqs[: self.params.n]  # running: the best live beams so far
        for beam in beams:
            beam.output_text = self.ops.decode(beam)
        return beams
