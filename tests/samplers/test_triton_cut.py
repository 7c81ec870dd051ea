"""The order-preserving keys of ``plugins.samplers.triton_cut`` (the bracket search compares keys, not floats).

The bracket search itself is tested through the sampling kernel against the
sorted reference (test_triton_sampling.py).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")
import triton.language as tl  # noqa: E402

from plugins.samplers.triton_cut import key_of, value_of  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _keys_kernel(x_ptr, key_ptr, back_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    key = key_of(x)
    tl.store(key_ptr + offs, key, mask=offs < n)
    tl.store(back_ptr + offs, value_of(key), mask=offs < n)


def test_keys_order_floats_and_invert():
    special = [float("-inf"), -3.4e38, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 3.4e38, float("inf")]
    x = torch.cat([torch.tensor(special), torch.randn(200) * 10, torch.randn(45).round()]).to(DEVICE)
    keys = torch.empty(len(x), dtype=torch.int32, device=DEVICE)
    back = torch.empty_like(x)
    _keys_kernel[(1,)](x, keys, back, len(x), BLOCK=triton.next_power_of_2(len(x)))
    x, keys, back = x.cpu(), keys.cpu(), back.cpu()
    # s < t <=> key(s) < key(t), with -0.0 and +0.0 one value (as torch compares them)
    assert torch.equal(x.unsqueeze(0) < x.unsqueeze(1), keys.unsqueeze(0) < keys.unsqueeze(1))
    assert torch.equal(x.unsqueeze(0) == x.unsqueeze(1), keys.unsqueeze(0) == keys.unsqueeze(1))
    assert torch.equal(back, x.masked_fill(x == 0, 0.0))  # value_of inverts key_of (-0.0 comes back +0.0)
