"""Decode graphs on pipeline stages (``cuda_graphs.py``, "Pipeline stages"), on the CPU.

Capture needs CUDA; ``benchmarks/check_tensor_parallel.py`` runs pipeline stages with
``FRAMEWORK_PP_CUDA_GRAPHS=1`` on GPUs. Here: the stage's recv/send while a graph is made, and the
order of a replay on a middle stage (receive into the bucket's input, replay, send its output).
"""

import numpy as np
import torch

from framework.distributed import parallel_state
from framework.distributed.parallel_state import PipelineStage, RankLayout, StageGraphIO
from framework.engine.cuda_graphs import DecodeGraphs
from framework.engine.input_batch import PreparedBatch


def test_stage_recv_and_send_use_the_bucket_buffers_while_a_graph_is_made(monkeypatch):
    sent = []
    monkeypatch.setattr(parallel_state.dist, "send", lambda t, dst: sent.append((dst, t.clone())))
    monkeypatch.setattr(parallel_state.dist, "recv", lambda t, src: t.fill_(src + 1))
    stage = PipelineStage(RankLayout(rank=1, tp_size=1, pp_size=3), torch.device("cpu"))  # a middle stage
    io = StageGraphIO()
    stage.graph_io, io.size = io, 8
    inbox = stage.recv((2, 8, 4), torch.float32)
    assert inbox.shape == (2, 8, 4) and not inbox.any()
    assert stage.recv((2, 8, 4), torch.float32) is inbox  # the graph reads one buffer per bucket
    out = torch.ones(2, 8, 4)
    stage.send(out)
    assert io.outbox == {8: out} and not sent  # nothing goes over the wire while the graph is made
    stage.graph_io = None
    assert torch.equal(stage.recv((2, 3, 4), torch.float32), torch.ones(2, 3, 4))  # eager: from rank 0
    stage.send(out)
    assert sent[0][0] == 2 and torch.equal(sent[0][1], out)  # eager: to rank 2


class _Recorder:
    def __init__(self):
        self.events = []


class _FakeGraph:
    def __init__(self, recorder, hidden, inbox):
        self.recorder, self.hidden, self.inbox = recorder, hidden, inbox

    def replay(self):
        self.recorder.events.append("replay")
        self.hidden.copy_(self.inbox[0] * 10)  # the graph's output depends on what was received


class _FakeStage:
    is_first, is_last = False, False

    def __init__(self, recorder):
        self.recorder = recorder

    def recv_into(self, out):
        self.recorder.events.append(("recv", tuple(out.shape)))
        out.fill_(3.0)

    def send_now(self, tensor):
        self.recorder.events.append(("send", tuple(tensor.shape)))


def test_a_middle_stage_receives_replays_and_sends_in_that_order():
    graphs = DecodeGraphs(model=None, backend=None, max_num_seqs=8, max_model_len=64, block_size=16,
                          device=torch.device("cpu"))  # fmt: skip
    recorder = _Recorder()
    graphs.pipeline, graphs._io = _FakeStage(recorder), StageGraphIO()
    size, hidden = 4, 5
    graphs._io.inbox[size] = torch.zeros(2, size, hidden)
    graphs._io.outbox[size] = torch.zeros(2, size, hidden)
    graphs._hidden[size] = torch.zeros(size, hidden)
    graphs._graphs[size] = _FakeGraph(recorder, graphs._hidden[size], graphs._io.inbox[size])
    n = 3  # three sequences: bucket 4
    prepared = PreparedBatch(
        seqs=[object()] * n, input_ids=np.arange(n), positions=np.arange(n) + 10, slot_mapping=np.arange(n) + 20,
        block_tables=np.zeros((n, 1), dtype=np.int32), seq_lens=np.full(n, 11, dtype=np.int32),
        query_start_loc=np.arange(n + 1, dtype=np.int32), num_decodes=n, logits_indices=np.arange(n),
        sample_seqs=[],
    )  # fmt: skip
    out = graphs.run(prepared)
    assert recorder.events == [("recv", (2, size, hidden)), "replay", ("send", (2, size, hidden))]
    assert out.shape == (n, hidden) and torch.all(out == 30.0)  # rows of the replay that read the received input
