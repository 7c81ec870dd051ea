"""Repetition, frequency and presence penalties in one pass over the logits (Triton).

The torch reference is ``processors.apply_penalties``: about fifteen
``[P, V]`` passes (casts, masks, two ``where``s, a gather and a scatter of
the rows). Here each element is read once -- the logit, its output count
and its prompt flag -- and written once, with the same float32 operations in
the same order (no fma contraction; division rounded to nearest), so the
result equals the reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _penalties_kernel(
    src_ptr, dst_ptr, stride_src, stride_dst,  # [N, V] float32 logits in and out (may be the same tensor)
    rows_ptr,  # [P] int64: the logits row of penalty row i
    counts_ptr, stride_counts,  # [P, V] int32 occurrences in the generated tokens
    prompt_ptr, stride_prompt,  # [P, V] uint8 token in the prompt (HAS_REPETITION)
    presence_ptr, frequency_ptr, repetition_ptr,  # [P] float32
    V,
    HAS_REPETITION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    row = tl.load(rows_ptr + i)
    x = tl.load(src_ptr + row * stride_src + offs, mask=mask, other=0.0)
    counts = tl.load(counts_ptr + i * stride_counts + offs, mask=mask, other=0)
    generated = counts > 0
    if HAS_REPETITION:
        seen = generated | (tl.load(prompt_ptr + i * stride_prompt + offs, mask=mask, other=0) != 0)
        penalty = tl.load(repetition_ptr + i)
        x = tl.where(seen, tl.where(x > 0, tl.math.div_rn(x, penalty), x * penalty), x)
    x = x - tl.load(frequency_ptr + i) * counts.to(tl.float32)
    x = x - tl.load(presence_ptr + i) * generated.to(tl.float32)
    tl.store(dst_ptr + row * stride_dst + offs, x, mask=mask)


def apply_penalties(src: torch.Tensor, dst: torch.Tensor, md) -> None:
    """Write the penalised rows ``md.penalty_rows`` of ``src`` into the same rows of ``dst``.

    Args:
        src: ``[N, V]`` float32 logits (unit stride along V).
        dst: ``[N, V]`` float32, may be ``src`` (in place); other rows are not touched.
        md: the step's ``SamplingMetadata`` with ``penalty_rows`` set.
    """
    counts, prompt = md.output_token_counts, md.prompt_token_mask
    num_rows, vocab = counts.shape[0], src.shape[1]
    assert src.stride(1) == 1 and dst.stride(1) == 1 and counts.stride(1) == 1
    if prompt is not None:
        prompt = prompt.contiguous().view(torch.uint8)
    _penalties_kernel[(num_rows, triton.cdiv(vocab, BLOCK))](
        src, dst, src.stride(0), dst.stride(0),
        md.penalty_rows,
        counts, counts.stride(0),
        prompt if prompt is not None else counts, prompt.stride(0) if prompt is not None else 0,
        md.presence_penalty, md.frequency_penalty, md.repetition_penalty,
        vocab,
        HAS_REPETITION=prompt is not None,
        BLOCK=BLOCK,
        num_warps=8,
        enable_fp_fusion=False,  # round the products and differences where torch does
    )  # fmt: skip
