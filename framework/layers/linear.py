"""Tensor-parallel linear layers that ask the quantization method for their weights.

Every layer calls ``ctx.linear_method(self, prefix)`` and falls back to
``UnquantizedLinearMethod``. The method creates the parameters (under
``with torch.device(ctx.device)``, so plain ``torch.empty`` lands on the right
device) and applies them. Sharding is the layer's business, described by
attributes on each parameter that the layer's ``weight_loader`` reads:

* ``output_dim`` / ``input_dim``: which tensor dim runs along the layer's
  output / input features (None or absent: not sharded along that axis);
* ``packed_dim`` / ``pack_factor``: that dim stores ``pack_factor`` logical
  values per element (int4 in int32), so offsets along it are divided.

A quant method may attach its own ``weight_loader`` to parameters the generic
one cannot handle; parameters left without one get the layer's. The layer
keeps its method as ``linear_method``; the model loader calls
``linear_method.process_weights_after_loading(layer)`` once all weights are in.

Sharding (``ctx.tp_rank`` of ``ctx.tp_size``)::

    ColumnParallelLinear   W [out, in]: rank r keeps rows  [r*out/tp, (r+1)*out/tp)
    RowParallelLinear      W [out, in]: rank r keeps cols  [r*in/tp,  (r+1)*in/tp), then all_reduce
    Merged [gate | up]     each of gate, up column-sharded, stored  [gate_r | up_r]
    QKV    [q | k | v]     q heads split; kv heads split, or replicated when tp > kv heads
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.interfaces import LinearMethod
from framework.layers.context import LayerContext
from framework.layers.weight_loading import check_shape, copy_into, default_weight_loader, describe, tag_parameters


class UnquantizedLinearMethod(LinearMethod):
    """Plain ``weight [out_per_partition, in_per_partition]`` applied with ``F.linear``."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, params_dtype):
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        weight.output_dim, weight.input_dim = 0, 1
        weight.weight_loader = layer.weight_loader
        layer.register_parameter("weight", weight)

    def apply(self, layer, x, bias=None):
        return dense_linear(x, layer.weight, bias)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or for a few rows (decode) on CUDA the Triton GEMV, which streams the weight once
    (``FRAMEWORK_TRITON_GEMV=0``: off)."""
    from framework import ops

    if x.shape[:-1].numel() <= 8 and ops.use_triton(x):
        from framework.ops import triton_gemv

        if triton_gemv.applies(x, weight, bias):
            out = triton_gemv.gemv(x.reshape(-1, x.shape[-1]), weight, bias)
            return out.view(*x.shape[:-1], out.shape[-1])
    return F.linear(x, weight, bias)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={d}")
    return n // d


def _stored(param: torch.Tensor, dim: int, n: int) -> int:
    """Logical size ``n`` along ``dim`` -> stored elements (packed dims hold several values each)."""
    if getattr(param, "packed_dim", None) == dim:
        return n // param.pack_factor
    return n


class LinearBase(nn.Module):
    """Creates the parameters through the quant method; subclasses define the sharding."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        bias: bool,
        bias_size: int,
        ctx: LayerContext | None,
        prefix: str,
    ):
        super().__init__()
        ctx = ctx or LayerContext()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_size_per_partition
        self.output_partition_sizes = output_partition_sizes
        self.output_size_per_partition = sum(output_partition_sizes)
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        self.all_reduce = ctx.all_reduce
        self.prefix = prefix
        self.linear_method = ctx.linear_method(self, prefix) or UnquantizedLinearMethod()
        with torch.device(ctx.device):
            self.linear_method.create_weights(self, input_size_per_partition, output_partition_sizes, ctx.dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(bias_size, dtype=ctx.dtype, device=ctx.device), requires_grad=False)
            self.bias.output_dim = 0
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        for param in self.parameters(recurse=False):
            if not hasattr(param, "weight_loader"):
                param.weight_loader = self.weight_loader
        tag_parameters(self, prefix)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)

    def _load_rank_slice(self, param, loaded_weight, dim: int | None) -> None:
        """Copy this rank's slice along ``dim`` of the full tensor (``dim`` None: the whole tensor)."""
        if dim is None:
            return default_weight_loader(param, loaded_weight)
        size = param.shape[dim]
        expected = list(param.shape)
        expected[dim] = size * self.tp_size
        check_shape(param, loaded_weight, tuple(expected))
        copy_into(param.data, loaded_weight.narrow(dim, self.tp_rank * size, size))

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, "
            f"tp={self.tp_rank}/{self.tp_size}, method={type(self.linear_method).__name__}"
        )


class ColumnParallelLinear(LinearBase):
    """``y = x W^T + b`` with the output features split across ranks (no gather)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, ctx=None, prefix: str = ""):
        tp = (ctx or LayerContext()).tp_size
        out_pp = _divide(output_size, tp, f"{prefix or 'linear'} output_size")
        super().__init__(input_size, output_size, input_size, [out_pp], bias, out_pp, ctx, prefix)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if shard_id is not None:
            raise ValueError(f"{describe(param)} is not fused; got shard {shard_id!r}")
        self._load_rank_slice(param, loaded_weight, getattr(param, "output_dim", None))


class FusedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored side by side, loaded one shard at a time.

    Subclasses define ``_shards``: shard_id -> (offset on this rank, size on
    this rank, start in the full checkpoint tensor, full size), all in
    logical output features.
    """

    def _shards(self) -> dict[object, tuple[int, int, int, int]]:
        raise NotImplementedError

    def weight_loader(self, param, loaded_weight, shard_id=None):
        dim = getattr(param, "output_dim", None)
        shards = self._shards()
        if dim is None:
            raise ValueError(f"{describe(param, shard_id)} has no output_dim; its quant method must give it a loader")
        if shard_id is None:  # the checkpoint stores the fused tensor: split it
            sizes = [_stored(param, dim, full) for (_, _, _, full) in shards.values()]
            expected = list(param.shape)
            expected[dim] = sum(sizes)
            check_shape(param, loaded_weight, tuple(expected))
            for sid, part in zip(shards, loaded_weight.split(sizes, dim)):
                self.weight_loader(param, part, sid)
            return
        if shard_id not in shards:
            raise ValueError(f"{describe(param)}: unknown shard {shard_id!r}; expected one of {list(shards)}")
        offset, size, start, full = (_stored(param, dim, n) for n in shards[shard_id])
        expected = list(param.shape)
        expected[dim] = full
        check_shape(param, loaded_weight, tuple(expected), shard_id)
        copy_into(param.data.narrow(dim, offset, size), loaded_weight.narrow(dim, start, size))


class MergedColumnParallelLinear(FusedColumnParallelLinear):
    """Column-parallel ``[out_0 | out_1 | ...]`` (e.g. gate and up); shard ids are 0, 1, ..."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, ctx=None, prefix: str = ""):
        tp = (ctx or LayerContext()).tp_size
        parts = [_divide(s, tp, f"{prefix or 'linear'} output_sizes[{i}]") for i, s in enumerate(output_sizes)]
        LinearBase.__init__(self, input_size, sum(output_sizes), input_size, parts, bias, sum(parts), ctx, prefix)
        self.output_sizes = list(output_sizes)

    def _shards(self):
        shards, offset = {}, 0
        for i, full in enumerate(self.output_sizes):
            size = full // self.tp_size
            shards[i] = (offset, size, self.tp_rank * size, full)
            offset += size
        return shards


class QKVParallelLinear(FusedColumnParallelLinear):
    """The fused ``[q | k | v]`` projection; shard ids are ``"q"``, ``"k"``, ``"v"``.

    Query heads are split across ranks. KV heads are split too when
    ``num_kv_heads >= tp_size``; otherwise each rank holds one KV head, rank
    ``r`` holding head ``r * num_kv_heads // tp_size`` (replication).

    Args:
        hidden_size: input features.
        head_dim: size of one head.
        num_heads / num_kv_heads: totals over all ranks.
        bias, ctx, prefix: as for the other linear layers.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        bias: bool = False,
        ctx=None,
        prefix: str = "",
    ):
        tp = (ctx or LayerContext()).tp_size
        num_kv_heads = num_kv_heads or num_heads
        heads_pp = _divide(num_heads, tp, f"{prefix or 'qkv'} num_heads")
        if num_kv_heads >= tp:
            kv_heads_pp = _divide(num_kv_heads, tp, f"{prefix or 'qkv'} num_kv_heads")
        elif tp % num_kv_heads:
            raise ValueError(f"tensor_parallel_size={tp} is not a multiple of num_kv_heads={num_kv_heads}")
        else:
            kv_heads_pp = 1  # more ranks than KV heads: replicate
        parts = [heads_pp * head_dim, kv_heads_pp * head_dim, kv_heads_pp * head_dim]
        output_size = (num_heads + 2 * num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, output_size, hidden_size, parts, bias, sum(parts), ctx, prefix)
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads, self.num_kv_heads = heads_pp, kv_heads_pp  # on this rank
        self.q_size, self.kv_size = parts[0], parts[1]

    def _shards(self):
        q, kv, d = self.q_size, self.kv_size, self.head_dim
        kv_start = (self.tp_rank * self.total_num_kv_heads // self.tp_size) * d
        return {
            "q": (0, q, self.tp_rank * q, self.total_num_heads * d),
            "k": (q, kv, kv_start, self.total_num_kv_heads * d),
            "v": (q + kv, kv, kv_start, self.total_num_kv_heads * d),
        }


class RowParallelLinear(LinearBase):
    """``y = all_reduce(x_r W_r^T) + b`` with the input features split across ranks.

    The input is already this rank's slice (the output of a column-parallel
    layer). The bias is replicated and added once, after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False, ctx=None, prefix: str = ""):
        tp = (ctx or LayerContext()).tp_size
        in_pp = _divide(input_size, tp, f"{prefix or 'linear'} input_size")
        super().__init__(input_size, output_size, in_pp, [output_size], bias, output_size, ctx, prefix)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if shard_id is not None:
            raise ValueError(f"{describe(param)} is not fused; got shard {shard_id!r}")
        # input_dim None: replicated (the bias, per-channel scales)
        self._load_rank_slice(param, loaded_weight, getattr(param, "input_dim", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.linear_method.apply(self, x, self.bias)
        out = self.all_reduce(self.linear_method.apply(self, x, None))
        return out if self.bias is None else out + self.bias

