"""Quantized layers shard like dense ones: a GPTQ and an AWQ checkpoint at TP=2 (CPU, gloo) give the same
greedy tokens and logprobs as one process. The checkpoints come from the independent packer of tests/quant."""

import sys
from pathlib import Path

import pytest

import framework
from framework.testing import make_tiny_model

sys.path.insert(0, str(Path(__file__).parents[1] / "quant"))
import reference_formats as ref  # noqa: E402

from .conftest import engine_settings  # noqa: E402
from .test_parallel_generation import assert_logprobs_close  # noqa: E402

CASES = {
    "gptq-4bit-g32-asym": ("gptq", {"bits": 4, "group_size": 32, "sym": False}),
    "gptq-8bit-channelwise": ("gptq", {"bits": 8, "group_size": -1, "sym": True}),
    "awq-g32": ("awq", {"group_size": 32}),
}
PARAMS = framework.SamplingParams(temperature=0, max_tokens=10, logprobs=2)
PROMPTS = ["Hello, my name is", "The capital of France is " * 5]


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_model_at_tp2_matches_one_process(case, tmp_path):
    method, opts = CASES[case]
    src = make_tiny_model("LlamaForCausalLM", tmp_path / "src", seed=5)
    qdir, _ = ref.quantize_checkpoint(src, tmp_path / "q", tmp_path / "dense", method, **opts)
    expected = framework.LLM(**engine_settings(qdir)).generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = framework.LLM(**engine_settings(qdir, tensor_parallel_size=2))
    try:
        got = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    for exp, out in zip(expected, got):
        assert out.outputs[0].token_ids == exp.outputs[0].token_ids
        assert_logprobs_close(exp.outputs[0].logprobs, out.outputs[0].logprobs)
