"""Per-step messages, worker specs, rank layout and the parallel-config checks (no processes)."""

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.config import EngineConfig
from framework.distributed import (
    RankLayout,
    check_parallel_config,
    make_executor,
    messages,
)
from framework.distributed.parallel_state import PipelineStage
from framework.distributed.worker import WorkerSpec, spec_from_json, spec_to_json
from framework.engine.input_batch import PreparedBatch, PromptLogprobRows
from framework.model_config import HFConfig, ModelConfig


def prepared_batch(rng, with_prompt_rows: bool) -> PreparedBatch:
    lens = np.array([1, 1, 5, 3])
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    t = int(qsl[-1])
    prompt = None
    if with_prompt_rows:
        prompt = PromptLogprobRows(hidden_rows=np.array([2, 3, 4]), targets=np.array([9, 8, 7]))
    return PreparedBatch(
        seqs=[object()] * 4,
        input_ids=rng.integers(0, 1000, t),
        positions=rng.integers(0, 200, t),
        slot_mapping=rng.integers(0, 4096, t),
        block_tables=rng.integers(0, 256, (4, 3)).astype(np.int32),
        seq_lens=rng.integers(1, 40, 4).astype(np.int32),
        query_start_loc=qsl,
        num_decodes=2,
        logits_indices=np.array([0, 1, 9]),
        sample_seqs=[object()] * 5,
        prompt_logprobs=prompt,
    )


@pytest.mark.parametrize("with_prompt_rows", [False, True])
def test_step_message_round_trip(with_prompt_rows):
    batch = prepared_batch(np.random.default_rng(0), with_prompt_rows)
    copies, swap_out, swap_in = [(1, 2), (3, 4)], [(5, 0)], [(0, 6), (1, 7)]
    header, payload = messages.encode_step(batch, copies, swap_out, swap_in)
    assert header.shape == (messages.HEADER_SIZE,) and header.dtype == np.int64 and payload.dtype == np.int64
    assert messages.step_payload_size(header) == len(payload)
    step = messages.decode_step(header, payload)
    got = step.prepared
    for name in ("input_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc",
                 "logits_indices"):  # fmt: skip
        np.testing.assert_array_equal(getattr(got, name), getattr(batch, name))
        assert getattr(got, name).dtype == getattr(batch, name).dtype
    assert got.num_decodes == 2 and got.num_tokens == batch.num_tokens
    assert len(got.seqs) == 4 and len(got.sample_seqs) == 5
    if with_prompt_rows:
        np.testing.assert_array_equal(got.prompt_logprobs.hidden_rows, [2, 3, 4])
    else:
        assert got.prompt_logprobs is None
    assert (step.copies, step.swap_out, step.swap_in) == (copies, swap_out, swap_in)


def test_block_moves_only_step():
    header, payload = messages.encode_step(None, [], [(3, 1)], [])
    step = messages.decode_step(header, payload)
    assert step.prepared is None and step.swap_out == [(3, 1)] and step.copies == [] and step.swap_in == []


def test_worker_spec_json_round_trip(tmp_path):
    mc = ModelConfig(
        path=Path(tmp_path), hf_config=HFConfig({"hidden_size": 64, "architectures": ["LlamaForCausalLM"]}),
        architecture="LlamaForCausalLM", dtype=torch.bfloat16, max_model_len=128, block_size=16,
        kv_cache_dtype="auto", eos_token_ids=[2],
    )  # fmt: skip
    config = EngineConfig(model=str(tmp_path), tensor_parallel_size=2, max_num_seqs=8)
    spec = WorkerSpec(
        RankLayout(1, 2, 1),
        1,
        "cpu",
        "tcp://127.0.0.1:1234",
        30.0,
        config,
        mc,
        99,
        logging.INFO,
    )
    back = spec_from_json(spec_to_json(spec))
    assert back == spec
    assert isinstance(back.model_config.hf_config, HFConfig) and back.model_config.dtype is torch.bfloat16


def test_rank_layout_and_stages():
    layouts = [RankLayout(r, 2, 3) for r in range(6)]
    assert [(x.tp_rank, x.pp_rank) for x in layouts] == [
        (0, 0),
        (1, 0),
        (0, 1),
        (1, 1),
        (0, 2),
        (1, 2),
    ]
    assert layouts[3].peer_in_stage(2) == 5 and layouts[0].tp_ranks(1) == [2, 3]
    ranges = [PipelineStage(RankLayout(r, 1, 3), torch.device("cpu")).layer_range(7) for r in range(3)]
    assert ranges == [(0, 2), (2, 4), (4, 7)]
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 is larger than num_hidden_layers=2"):
        PipelineStage(RankLayout(0, 1, 3), torch.device("cpu")).layer_range(2)


def _model_config(**hf) -> ModelConfig:
    hf = HFConfig({"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, **hf})  # fmt: skip
    return ModelConfig(Path("."), hf, "LlamaForCausalLM", torch.float32, 64, 16, "auto")


@pytest.mark.parametrize(
    "settings, hf, message",
    [
        ({"tensor_parallel_size": 3}, {}, "tensor_parallel_size=3 must divide num_attention_heads=4"),
        ({"tensor_parallel_size": 4}, {"num_key_value_heads": 3, "num_attention_heads": 12},
         "tensor_parallel_size=4 must divide num_key_value_heads=3 or be a multiple of it"),
        ({"tensor_parallel_size": 2}, {"intermediate_size": 129}, "must divide intermediate_size=129"),
        ({"pipeline_parallel_size": 3}, {}, "pipeline_parallel_size=3 must be at most num_hidden_layers=2"),
    ],
)  # fmt: skip
def test_parallel_config_errors_name_the_setting(settings, hf, message):
    with pytest.raises(ValueError, match=message):
        check_parallel_config(EngineConfig(**settings), _model_config(**hf))


def test_accepted_splits():
    check_parallel_config(EngineConfig(tensor_parallel_size=4), _model_config())  # 2 KV heads replicated
    check_parallel_config(EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=2), _model_config())


def test_torchrun_backend_needs_its_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    config = EngineConfig(tensor_parallel_size=2, distributed_executor_backend="torchrun")
    with pytest.raises(ValueError, match="needs the torchrun environment; RANK"):
        make_executor(config, _model_config(), None, torch.device("cpu"), None)


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        EngineConfig(distributed_executor_backend="slurm")


def test_leaving_the_groups_is_bounded(monkeypatch):
    """A teardown stuck in the backend (NCCL after a CUDA graph captured a collective, pytorch#115388)
    must not hold up the shutdown: ``destroy`` gives up after its timeout and says so."""
    from framework.distributed import parallel_state

    stuck = threading.Event()
    monkeypatch.setattr(parallel_state.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(parallel_state.dist, "destroy_process_group", lambda: stuck.wait(30))
    state = object.__new__(parallel_state.ParallelState)
    state.backend = "nccl"
    start = time.monotonic()
    try:
        assert state.destroy(timeout_s=0.3) is False
        assert time.monotonic() - start < 2
    finally:
        stuck.set()  # let the teardown thread end
    monkeypatch.setattr(parallel_state.dist, "destroy_process_group", lambda: None)
    assert state.destroy(timeout_s=5) is True
