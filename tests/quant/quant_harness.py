"""Shared by the quantized-checkpoint tests: load a test module, run the engine against transformers.

The oracle is transformers on the *dequantized* weights (reference_formats
writes them beside each quantized checkpoint): our engine, loading the packed
checkpoint, must give the same prompt logprobs and the same greedy tokens
with the same logprobs, in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import framework

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Hello", "1 2 3 4 5 6 7 8"]
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def build_engine(model_dir: Path, **overrides):
    config = {"model": str(model_dir), "dtype": "float32", "device": "cpu", "max_model_len": 64, **overrides}
    return framework.build(config)


def assert_matches_reference(llm, ref_dir: Path, max_tokens: int = 4, tol: float = 1e-4) -> None:
    """Prompt logprobs, greedy tokens and their logprobs equal transformers' on the dequantized weights.

    ``tol`` (relative and absolute) is for fp32; half-precision runs pass a
    larger one and skip the greedy-token check (near ties may flip).
    """
    hf = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    params = framework.SamplingParams(
        temperature=0, max_tokens=max_tokens, logprobs=1, prompt_logprobs=1, ignore_eos=True
    )
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        prompt, completion = out.prompt_token_ids, out.outputs[0]
        ids = prompt + completion.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        assert ref.max(-1).values.sub(ref.min(-1).values).min() > 1.0  # logits are far from flat
        got = [out.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(prompt))]
        got += [entry[tok].logprob for tok, entry in zip(completion.token_ids, completion.logprobs)]
        expected = [float(ref[p - 1, ids[p]]) for p in range(1, len(ids))]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=tol, atol=tol)
        if tol <= 1e-4:
            greedy = ref[len(prompt) - 1 : len(ids) - 1].argmax(-1).tolist()
            assert completion.token_ids == greedy
