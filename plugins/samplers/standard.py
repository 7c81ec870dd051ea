"""The standard sampler: greedy and random sampling, vectorised over the batch.

One call handles N rows, each with its own temperature, top-k, top-p, min-p
and (optionally) its own ``torch.Generator``. Everything stays on the logits'
device: no ``.item()``/``.tolist()``/``.cpu()``; the only Python loop runs over
the rows that carry a per-request generator. The host-side flags of
``SamplingMetadata`` let whole stages be skipped without looking at tensors.

Pipeline of a row (``processors.py`` first: ``min_tokens`` bans, logit
bias, penalties; greedy rows then take the argmax of the processed logits):

1. ``x = processed_logits / temperature``;
2. top-k and top-p from ONE descending sort of ``x``: in sorted order, drop
   positions ``>= k``, then drop every position whose exclusive cumulative
   probability (mass of the strictly better-ranked survivors) is already
   ``>= top_p``. Position 0 always survives. The drop mask is scattered back
   to vocabulary order, so exactly k tokens survive even with ties;
3. ``probs = softmax(x)``; min-p zeroes tokens with
   ``probs < min_p * max(probs)``;
4. exponential race: ``token = argmax(probs / q)``, ``q ~ Exponential(1)``
   i.i.d. per element. ``P(argmax = i) = probs_i / sum(probs)``, so this is
   exact sampling from the (unnormalised) filtered distribution without a
   multinomial's host sync.

Log-probabilities are those of the RAW logits (before processing,
temperature and the filters), as in vLLM: ``logits[token] -
logsumexp(logits)``; rows in ``metadata.processed_logprob_rows`` (beam search)
get those of the processed logits instead.

On a GPU (float32 logits with unit stride, Triton installed) steps 1-4 are
one Triton program per row (``triton_sampling``) that finds each row's cut
without sorting the vocabulary -- or, for a few rows without top-k/top-p,
programs over (row, vocabulary chunk) -- and the penalties are one Triton pass
(``triton_penalties``). The torch code here is the reference and the CPU
path. Both draw the same noise ``q``, so a row's token depends only on its
logits, its parameters and its noise. Tokens tied at the top-k / top-p cut
are kept in vocabulary order (lowest id first) on both paths, as a stable
sort ranks them.
"""

from __future__ import annotations

import torch

from framework.interfaces import Sampler
from framework.sampling_metadata import SamplerOutput, SamplingMetadata
from plugins.samplers.processors import apply_logits_processors

# Rows with temperature below this are greedy (same threshold as SamplingParams).
_GREEDY_EPS = 1e-5


class StandardSampler(Sampler):
    """Greedy / temperature / top-k / top-p / min-p sampling with penalties and raw logprobs.

    Args:
        use_triton: None (default): the Triton kernels for CUDA tensors, torch
            otherwise; True / False force one path (tests, benchmarks).
    """

    name = "standard"

    def __init__(self, use_triton: bool | None = None):
        self.use_triton = use_triton

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row.

        Args:
            logits: ``[N, V]`` float32 raw logits (not modified).
            metadata: per-row parameters as tensors on the logits' device.
        Returns:
            ``SamplerOutput`` on the device: token ids, their raw logprobs and,
            when ``metadata.max_num_logprobs > 0``, the top logprobs and ranks.
        """
        logits = logits.float()
        use_triton = self._triton_path(logits)
        processed = apply_logits_processors(logits, metadata, use_triton)
        lse = None  # logsumexp of the raw rows, when the kernel computed it
        if metadata.all_greedy:
            token_ids = processed.argmax(dim=-1)
        elif use_triton:
            # Greedy rows included; lse: of the raw logits (their logprobs are returned).
            token_ids, lse = _triton_sample(processed, logits, metadata)
        else:
            token_ids = _random_sample(processed, metadata)
            if not metadata.all_random:
                greedy = metadata.temperature < _GREEDY_EPS
                token_ids = torch.where(greedy, processed.argmax(dim=-1), token_ids)
        source = logits
        if metadata.processed_logprob_rows is not None and processed is not logits:
            source = torch.where(metadata.processed_logprob_rows.unsqueeze(1), processed, logits)
        return _logprobs(source, token_ids, metadata.max_num_logprobs, lse if source is logits else None)

    def _triton_path(self, logits: torch.Tensor) -> bool:
        if self.use_triton is not None:
            return self.use_triton
        return logits.is_cuda and logits.stride(-1) == 1 and _triton_available()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_sample(
    processed: torch.Tensor, raw: torch.Tensor, md: SamplingMetadata
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (greedy rows: the argmax) and the logsumexp of each raw row, by ``triton_sampling``."""
    from plugins.samplers import triton_sampling

    q = exponential_noise(processed, md.generators)
    return triton_sampling.filtered_sample(
        processed, q, md.temperature,
        None if md.no_top_k else md.top_k,
        None if md.no_top_p else md.top_p,
        None if md.no_min_p else md.min_p,
        raw=None if raw is processed else raw,
        any_greedy=not md.all_random,
    )  # fmt: skip


def _random_sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Tokens ``[N]`` drawn from every row's filtered distribution (greedy rows: any)."""
    return filtered_race(logits, md, exponential_noise(logits, md.generators))


def filtered_race(logits: torch.Tensor, md: SamplingMetadata, q: torch.Tensor) -> torch.Tensor:
    """Steps 1-4 of the module docstring with the noise ``q`` given (the reference of ``triton_sampling``)."""
    # Greedy rows get temperature 1 here so nothing divides by zero; their
    # draw is replaced by the argmax afterwards.
    temperature = md.temperature.masked_fill(md.temperature < _GREEDY_EPS, 1.0)
    x = logits / temperature.unsqueeze(1)
    if not (md.no_top_k and md.no_top_p):
        x = _apply_top_k_top_p(x, None if md.no_top_k else md.top_k, None if md.no_top_p else md.top_p)
    probs = torch.softmax(x, dim=-1)
    if not md.no_min_p:
        # Relative threshold: invariant to the renormalisation the filters imply.
        threshold = md.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return _exponential_race(probs, q)


def _apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the tokens outside each row's top-k / nucleus set to -inf.

    Args:
        x: ``[N, V]`` temperature-scaled logits.
        top_k: ``[N]`` int64 or None; values ``>= V`` (or ``<= 0``) are off.
        top_p: ``[N]`` float32 or None; 1.0 is off.
    """
    vocab = x.shape[-1]
    x_sorted, order = x.sort(dim=-1, descending=True, stable=True)  # ties: lowest id first
    # drop[i, j]: the token ranked j-th in row i is filtered out.
    drop = torch.zeros_like(x_sorted, dtype=torch.bool)
    if top_k is not None:
        k = torch.where(top_k <= 0, vocab, top_k).clamp(max=vocab)
        positions = torch.arange(vocab, device=x.device)
        drop = positions.unsqueeze(0) >= k.unsqueeze(1)
        x_sorted = x_sorted.masked_fill(drop, float("-inf"))
    if top_p is not None:
        probs_sorted = torch.softmax(x_sorted, dim=-1)
        # Mass of the tokens ranked strictly before j: token j is still needed
        # while that mass is below top_p. Rows with top_p == 1 keep everything
        # (the guard stops float round-off in the cumsum from trimming tails).
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        drop = drop | ((mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1))
        drop[:, 0] = False  # the most likely token always survives
    # Back to vocabulary order: token order[i, j] gets drop[i, j].
    drop_vocab = torch.empty_like(drop).scatter_(1, order, drop)
    return x.masked_fill(drop_vocab, float("-inf"))


def exponential_noise(like: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """``q ~ Exponential(1)`` i.i.d., shaped like ``like``: the noise of the exponential race.

    Rows in ``generators`` draw their ``q`` from their own generator (exactly
    V numbers per step), so a seeded request's tokens do not depend on the
    rest of the batch; the other rows use the device's default generator.
    """
    q = torch.empty_like(like).exponential_()
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    return q


def _exponential_race(probs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``argmax(probs / q)`` with ``q ~ Exponential(1)``: a draw from ``probs`` per row (clamps ``q`` in place)."""
    # q == 0 (possible in float) would turn a filtered 0 into 0/0 = nan, which
    # argmax would pick; the smallest normal float keeps 0 / q == 0.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def _logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int, lse: torch.Tensor | None = None
) -> SamplerOutput:
    """Raw-logit logprobs of ``token_ids``, plus top-``num_top`` and ranks when asked.

    ``log_softmax(logits)[t] = logits[t] - logsumexp(logits)``: only the
    gathered entries are computed, never a second ``[N, V]`` tensor.
    ``lse``: the rows' logsumexp when already known (``[N]``).
    """
    lse = torch.logsumexp(logits, dim=-1, keepdim=True) if lse is None else lse.unsqueeze(1)
    chosen = logits.gather(1, token_ids.unsqueeze(1))
    out = SamplerOutput(token_ids=token_ids, logprobs=(chosen - lse).squeeze(1))
    if num_top > 0:
        top_values, top_ids = logits.topk(num_top, dim=-1)  # sorted, descending
        out.top_token_ids = top_ids
        out.top_logprobs = top_values - lse
        # Rank 1 is the most likely token; equal logits share the better rank.
        out.ranks = (logits > chosen).sum(dim=-1) + 1
    return out
