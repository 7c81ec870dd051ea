"""The peer-memory all-reduce switch (``framework.distributed.symm_allreduce``), on the CPU.

The one-shot kernel itself needs CUDA devices joined by NVLink:
``benchmarks/bench_allreduce.py --impl symm`` checks its sums and times it there.
These tests check what decides between it and NCCL.
"""

import pytest
import torch

from framework.distributed import symm_allreduce


class FakeFast:
    """Takes tensors of at most ``limit`` elements; returns x * 2 (a two-rank sum of equal tensors)."""

    def __init__(self, limit):
        self.limit, self.calls = limit, 0

    def fits(self, x):
        return x.numel() <= self.limit

    def __call__(self, x):
        self.calls += 1
        return x * 2


def test_small_tensors_take_the_fast_path_and_large_ones_nccl(monkeypatch):
    nccl_calls = []
    monkeypatch.setattr(symm_allreduce.dist, "all_reduce", lambda x, group: nccl_calls.append(x.shape) or x.mul_(3))
    fast = FakeFast(limit=8)
    small = torch.ones(2, 4)
    out = symm_allreduce.all_reduce(small, "group", fast)
    assert fast.calls == 1 and not nccl_calls and torch.equal(out, torch.full((2, 4), 2.0))
    large = torch.ones(3, 4)
    out = symm_allreduce.all_reduce(large, "group", fast)
    assert fast.calls == 1 and nccl_calls == [(3, 4)] and out is large and torch.equal(large, torch.full((3, 4), 3.0))
    out = symm_allreduce.all_reduce(small, "group", None)  # not asked for: NCCL (here, the stand-in) always
    assert nccl_calls[-1] == (2, 4) and out is small


def test_only_asked_for_and_only_on_cuda(monkeypatch):
    monkeypatch.delenv("FRAMEWORK_SYMM_MEM_ALLREDUCE", raising=False)
    assert symm_allreduce.make_symm_all_reduce(object(), torch.device("cuda", 0)) is None  # off by default
    monkeypatch.setenv("FRAMEWORK_SYMM_MEM_ALLREDUCE", "1")
    assert symm_allreduce.make_symm_all_reduce(object(), torch.device("cpu")) is None
    assert symm_allreduce.make_symm_all_reduce(None, torch.device("cuda", 0)) is None  # no TP group


def test_no_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs CUDA devices"):
        symm_allreduce.SymmMemAllReduce(object(), torch.device("cpu"))
