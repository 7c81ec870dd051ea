"""Decode CUDA graphs: bucket sizes, and the static-buffer path on the CPU.

On the CPU ``DecodeGraphs`` runs the captured function eagerly on its static
buffers (no graph exists), so these tests check everything but the capture
itself: bucket choice, the copy of each step's inputs into the persistent
buffers, and the padding of unused rows (slot -1, seq_len 0), through the
Triton backend under the interpreter. ``benchmarks/check_cuda_graphs.py``
checks real graph replay on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel modules are first imported

import framework  # noqa: E402
from framework.engine.cuda_graphs import capture_sizes  # noqa: E402
from framework.testing import make_tiny_model  # noqa: E402


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35
    assert all(b - a == 8 for a, b in zip(sizes[3:], sizes[4:]))
    assert capture_sizes(300)[-4:] == [256, 272, 288, 300]


def _generate(path, backend: str, graphs: bool, prompts, max_tokens, monkeypatch, **settings):
    if backend == "triton":
        pytest.importorskip("triton")
        from plugins.kernels.triton_paged import TritonPagedAttention

        monkeypatch.setattr(TritonPagedAttention, "supports", classmethod(lambda cls, **kw: None))
    llm = framework.LLM(
        str(path), attention_backend=backend, max_model_len=128, block_size=16, device="cpu", **settings
    )
    runner = llm.engine.runner
    if graphs:
        runner.enable_decode_graphs()
        replays = []
        run = runner.graphs.run
        runner.graphs.run = lambda prepared, *ids: replays.append(len(prepared.seqs)) or run(prepared, *ids)
    params = [framework.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0) for n in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = [(o.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
              for o in outs]  # fmt: skip
    return result, (replays if graphs else None)


@pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on CPU tensors needs the interpreter; on a GPU, benchmarks/check_cuda_graphs.py checks the graphs",
)
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_static_buffers_match_eager_steps(tmp_path, monkeypatch, async_scheduling):
    """Greedy tokens through padded buckets equal the torch backend's (float32, Triton interpreter); with
    async scheduling the replays take their input ids from the previous step's samples on the device."""
    path = make_tiny_model("LlamaForCausalLM", tmp_path / "m", num_key_value_heads=2)
    prompts = [[5, 9, 13], [7] * 20, [3, 4], list(range(11, 29)), [8] * 33]
    max_tokens = [7, 4, 2, 7, 5]  # 5 running sequences (bucket 8), then 4, 3 (bucket 4), 2 (bucket 2)
    ref, _ = _generate(path, "torch", False, prompts, max_tokens, monkeypatch, max_num_seqs=8)
    got, replays = _generate(path, "triton", True, prompts, max_tokens, monkeypatch, max_num_seqs=8,
                             async_scheduling=async_scheduling)  # fmt: skip
    assert {5, 3, 2} <= set(replays)
    for (ids, lps), (ref_ids, ref_lps) in zip(got, ref):
        assert ids == ref_ids
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-4


def test_enforce_eager_is_a_flag_and_the_cpu_never_captures(tmp_path):
    path = make_tiny_model("LlamaForCausalLM", tmp_path / "m")
    llm = framework.LLM(str(path), max_model_len=64, device="cpu", enforce_eager=True)
    assert llm.engine.runner.graphs is None and not llm.engine.runner.use_cuda_graphs
    llm = framework.LLM(str(path), max_model_len=64, device="cpu")
    assert llm.engine.runner.graphs is None  # graphs are for CUDA devices


def test_release_graphs_drops_them(tmp_path):
    """Before leaving NCCL groups a rank drops its graphs (pytorch#115388); the engine then runs eagerly."""
    path = make_tiny_model("LlamaForCausalLM", tmp_path / "m")
    llm = framework.LLM(str(path), max_model_len=64, device="cpu")
    runner = llm.engine.runner
    runner.enable_decode_graphs()
    assert runner.graphs is not None
    runner.release_graphs()
    assert runner.graphs is None
    runner.release_graphs()  # twice is harmless
    out = llm.generate([[5, 9, 13]], framework.SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
