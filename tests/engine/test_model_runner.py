"""Model-runner host paths: sampling-metadata reuse across steps and final-only step outputs."""

from __future__ import annotations

import framework
import framework.engine.model_runner as model_runner
from framework.testing import make_tiny_model


def _llm(tmp_path):
    path = make_tiny_model("LlamaForCausalLM", tmp_path / "m")
    return framework.LLM(str(path), max_model_len=128, device="cpu")


def _count_builds(monkeypatch) -> list[int]:
    calls: list[int] = []
    build = model_runner.build_sampling_metadata
    def counted(seqs, *args, **kwargs):
        calls.append(len(seqs))
        return build(seqs, *args, **kwargs)

    monkeypatch.setattr(model_runner, "build_sampling_metadata", counted)
    return calls


def test_sampling_metadata_is_reused_while_the_batch_is_unchanged(tmp_path, monkeypatch):
    llm = _llm(tmp_path)
    params = [framework.SamplingParams(temperature=0.8, seed=i, max_tokens=8, ignore_eos=True) for i in range(3)]
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    calls = _count_builds(monkeypatch)
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert again == reference  # seeded: reuse changes nothing
    assert len(calls) == 1  # 8 sampling steps of the same 3 sequences, one build


def test_metadata_with_penalties_is_rebuilt_every_step(tmp_path, monkeypatch):
    llm = _llm(tmp_path)
    calls = _count_builds(monkeypatch)
    params = framework.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, frequency_penalty=1.0)
    llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False)
    assert len(calls) == 6  # the output-token counts change every step


def test_final_only_steps_return_finished_requests_only(tmp_path):
    engine = _llm(tmp_path).engine
    engine.add_request([5, 6, 7], framework.SamplingParams(max_tokens=2, ignore_eos=True))
    engine.add_request([8, 9], framework.SamplingParams(max_tokens=4, ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        outs = engine.step(final_only=True)
        assert all(o.finished for o in outs)
        seen += [(o.request_id, len(o.outputs[0].token_ids)) for o in outs]
    assert seen == [("0", 2), ("1", 4)]
