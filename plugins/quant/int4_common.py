"""The one in-memory layout every integer weight-only layer (GPTQ, AWQ) is converted to.

After ``process_weights_after_loading`` a layer holds (K input features, N
output features on this rank, ``pack = 32 // bits``)::

    qweight  int32 [K // pack, N]   bits slice j (lowest bits first) of qweight[r, n]
                                    is the unsigned value q of input k = r * pack + j
    scales   act dtype [G, N]       G = K // group_size
    zeros    act dtype [G, N]       the real zero point (not the GPTQ "stored - 1")
    perm     None | int64 [K]       act-order: apply() multiplies x[..., perm]
    bits, group_size                attributes (group_size == K for "-1" checkpoints)

    W[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n],   g = k // group_size

``apply_int_weight`` runs the Triton kernel
(``plugins.quant.triton_int4.int4_matmul``) on CUDA when it imports, and
otherwise dequantizes and calls ``F.linear`` (the CPU path, and the reference).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# fused layer name -> the checkpoint linears it holds (for skip lists)
FUSED_COMPONENTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


# -- bit packing -------------------------------------------------------------


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[R, N]`` packed along dim 0 -> int32 ``[R * pack, N]`` values in ``[0, 2**bits)``."""
    pack, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    values = (packed.unsqueeze(1) >> shifts.view(1, pack, 1)) & mask  # [R, pack, N]
    return values.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[R, C]`` packed along dim 1 (slot j of column c is column ``c * pack + j``) -> ``[R, C * pack]``."""
    pack, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    values = (packed.unsqueeze(2) >> shifts.view(1, 1, pack)) & mask  # [R, C, pack]
    return values.reshape(packed.shape[0], -1)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``unpack_rows``: ``[K, N]`` values in ``[0, 2**bits)`` -> int32 ``[K // pack, N]``."""
    pack = 32 // bits
    if values.shape[0] % pack:
        raise ValueError(f"{values.shape[0]} rows are not a multiple of the pack factor {pack}")
    shifts = torch.arange(0, 32, bits, device=values.device, dtype=torch.int64)
    grouped = values.to(torch.int64).reshape(-1, pack, values.shape[1])
    words = (grouped << shifts.view(1, pack, 1)).sum(dim=1)  # in [0, 2**32): no overlap between slots
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# -- the layout ----------------------------------------------------------------


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """The layout above -> dense ``W [N, K]`` in ``scales.dtype``."""
    q = unpack_rows(qweight, bits)  # [K, N]
    if q.shape[0] != scales.shape[0] * group_size:
        raise ValueError(f"qweight holds {q.shape[0]} input features but scales cover {scales.shape[0]} x {group_size}")
    zeros_k = zeros.repeat_interleave(group_size, dim=0)
    scales_k = scales.repeat_interleave(group_size, dim=0)
    return ((q.to(scales.dtype) - zeros_k) * scales_k).t()


def set_int_layout(
    layer: nn.Module,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    bits: int,
    group_size: int,
    drop: Iterable[str] = (),
) -> None:
    """Install the layout on ``layer`` (replacing the checkpoint's parameters; ``drop`` names extra ones)."""
    for name in ("qweight", "scales", "zeros", "qzeros", "g_idx", *drop):
        if name in layer._parameters:
            del layer._parameters[name]
        if name in layer._buffers:
            del layer._buffers[name]
    layer.register_parameter("qweight", nn.Parameter(qweight.contiguous(), requires_grad=False))
    layer.register_parameter("scales", nn.Parameter(scales.contiguous(), requires_grad=False))
    layer.register_parameter("zeros", nn.Parameter(zeros.contiguous(), requires_grad=False))
    layer.register_buffer("perm", None if perm is None else perm.to(torch.int64).contiguous(), persistent=False)
    layer.bits, layer.group_size = bits, group_size
    mma = _mma_layout(qweight, scales, zeros, bits, group_size)
    # a merged gate/up projection whose halves feed SiluAndMul (``gated_silu``, set by the model): the two
    # halves' row blocks interleaved, so that the kernel can write silu(gate) * up itself (apply_int_silu)
    layer.mma_paired = bool(mma is not None and FUSED_SILU and getattr(layer, "gated_silu", False)
                            and not SINGLE_COPY and mma[0].shape[0] % 2 == 0)  # fmt: skip
    if layer.mma_paired:
        from plugins.quant.int4_mma_layout import pair_halves

        mma = pair_halves(*mma)
    layer.register_buffer("mma_qweight", None if mma is None else mma[0], persistent=False)
    layer.register_buffer("mma_szp", None if mma is None else mma[1], persistent=False)
    if mma is not None and SINGLE_COPY:  # steps of more rows dequantize the reordered codes instead
        del layer._parameters["qweight"]
        layer.register_parameter("qweight", None)


def _mma_layout(qweight, scales, zeros, bits, group_size) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tensor-core copy of a 4-bit layer for decode steps of few rows (``plugins.quant.int4_mma``), on
    CUDA when the shape, dtype and zero points allow it and the kernel passed its self-check here; else None.
    It is a second copy of the codes (the tiled and dequantizing paths for more rows read ``qweight``) unless
    SINGLE_COPY drops the first."""
    if bits != 4 or os.environ.get("FRAMEWORK_INT4_MMA", "1") == "0":
        return None
    try:
        from plugins.quant import int4_mma, int4_mma_layout as layout
    except Exception as err:  # noqa: BLE001 - no triton: the other paths remain
        logger.warning("int4 tensor-core kernel unavailable (%s)", err)
        return None
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if not layout.supported(n, k, group_size, bits) or scales.dtype not in layout.MAGIC_VALUE:
        return None
    try:
        szp = layout.pack_scales(scales, zeros)
    except ValueError:  # zero points that are not small integers
        return None
    if not _mma_usable(qweight.device, scales.dtype):
        return None
    return layout.repack(unpack_rows(qweight, 4)), szp


def _mma_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the tensor-core kernel serves layers on ``device`` (CUDA, self-check passed). The CPU tests
    stand in the Triton interpreter here (``int4_mma`` emulates its asm on CPU tensors)."""
    from plugins.quant import int4_mma

    return device.type == "cuda" and int4_mma.usable(device, dtype)


# FRAMEWORK_INT4_FUSED_SILU=1: the gate/up projection of a decode step writes silu(gate) * up itself (one kernel
# less a layer). On an H200 (docs/benchmarks.md) batch-1 decode gained 1.5% (2.581 -> 2.538 ms, 2.588 -> 2.549
# ms) but batch 32 lost 14% (4.381 -> 4.983 ms): the paired layout's plain output at 17-32 rows is slower. The
# likely cause, from a local compile for sm_90 (not profiled): that program takes 136 registers instead of
# 128, so three programs fit a multiprocessor instead of four. Off by default.
FUSED_SILU = os.environ.get("FRAMEWORK_INT4_FUSED_SILU", "0") == "1"
# Steps of more rows run the paired projection and SiluAndMul: on an H200 the gated programs were slower from
# 16 rows on (docs/benchmarks.md: batch-16 decode 3.72 against 3.33 ms, batch 32 5.12 against 4.37 ms).
FUSED_SILU_MAX_M = 8

# FRAMEWORK_INT4_SINGLE_COPY=1: a 4-bit layer on CUDA keeps only the tensor-core layout; steps of up to
# int4_mma.MAX_M rows take that kernel, longer ones dequantize it (Triton) and run one GEMM. It saves the
# second copy of the codes; the speed of steps of 9 to 255 rows against the tiled kernel is not yet measured,
# so it is off by default.
SINGLE_COPY = os.environ.get("FRAMEWORK_INT4_SINGLE_COPY", "0") == "1"


@functools.lru_cache(maxsize=1)
def _triton_matmul() -> Callable | None:
    try:
        from plugins.quant.triton_int4 import int4_matmul
    except Exception as err:  # no triton, or the kernel module is absent: dequantize instead
        logger.warning("Triton int4 GEMM unavailable (%s); using dequantize + F.linear", err)
        return None
    return int4_matmul


def apply_int_weight(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for a layer in the layout above; ``x`` is ``[..., K]``."""
    x2d = _code_order(layer, x)
    out = _apply_mma(layer, x2d) if getattr(layer, "mma_qweight", None) is not None else None
    if out is None:
        matmul = _triton_matmul() if x.is_cuda else None
        if matmul is not None:
            out = matmul(x2d.contiguous(), layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.bits)
        else:
            weight = dequantize(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size)
            out = F.linear(x2d, weight.to(x.dtype))
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def apply_int_silu(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``silu(gate) * up`` of the merged gate/up projection ``x @ W^T`` in one kernel (``[..., N / 2]``), for a
    layer in the paired tensor-core layout (``gated_silu``) and a step that kernel takes; else None (the
    caller runs the projection and SiluAndMul)."""
    if bias is not None or not fuses_int_silu(layer, x.shape[:-1].numel()):
        return None
    out = _apply_mma(layer, _code_order(layer, x), gated=True)
    return None if out is None else out.reshape(*x.shape[:-1], out.shape[-1])


def fuses_int_silu(layer: nn.Module, rows: int) -> bool:
    """Whether ``apply_int_silu`` takes a step of ``rows`` rows of ``layer`` (a bias aside)."""
    return getattr(layer, "mma_paired", False) and 0 < rows <= FUSED_SILU_MAX_M


def _code_order(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, K]`` with its inputs in the codes' order (act-order checkpoints reorder them)."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if layer.perm is None else x2d.index_select(1, layer.perm)


def _apply_mma(layer: nn.Module, x2d: torch.Tensor, gated: bool = False) -> torch.Tensor | None:
    """``x2d @ W^T`` (``gated``: ``silu(gate) * up`` of it, paired layers only) from the tensor-core copy
    (``plugins.quant.int4_mma``), or None where the other kernels take the step (more rows than the kernel is
    sent, another dtype, unaligned rows, no rows) with ``qweight``."""
    from plugins.quant import int4_mma, int4_mma_layout

    only = layer.qweight is None  # the single-copy layout (SINGLE_COPY): every step goes through this copy
    m = x2d.shape[0]
    if 0 < m <= (int4_mma.MAX_M if only else int4_mma.LAYER_MAX_M) and x2d.dtype == layer.scales.dtype:
        rows = x2d.contiguous()
        if only and not int4_mma.aligned(rows):
            rows = rows.clone()  # a fresh allocation is aligned
        if int4_mma.aligned(rows):
            paired = getattr(layer, "mma_paired", False)
            return int4_mma.matmul(rows, layer.mma_qweight, layer.mma_szp, layer.group_size, paired=paired, gated=gated)
    if not only or gated:
        return None
    if m == 0:
        return x2d.new_empty((0, layer.mma_qweight.shape[0] * 16))
    weight = int4_mma_layout.dequantize(layer.mma_qweight, layer.scales, layer.zeros, layer.group_size)
    return torch.matmul(x2d.to(weight.dtype), weight).to(x2d.dtype)


# -- shared by the quant configs -------------------------------------------------


def make_param(layer: nn.Module, name: str, tensor: torch.Tensor, **attrs) -> nn.Parameter:
    """Register ``tensor`` as a frozen parameter carrying the sharding ``attrs`` (see framework/layers/linear.py)."""
    param = nn.Parameter(tensor, requires_grad=False)
    for key, value in attrs.items():
        setattr(param, key, value)
    layer.register_parameter(name, param)
    return param


def check_choice(method: str, field: str, value, allowed: Iterable) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{method} {field}={value!r} is not supported; {field} must be one of {allowed}")


def check_group_size(method: str, group_size) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size != -1 and group_size <= 0):
        raise ValueError(f"{method} group_size={group_size!r} is not supported; group_size must be -1 or > 0")
    return group_size


def component_names(prefix: str) -> list[str]:
    """``...self_attn.qkv_proj`` -> the checkpoint names ``...q_proj``, ``...k_proj``, ``...v_proj``."""
    head, _, last = prefix.rpartition(".")
    parts = FUSED_COMPONENTS.get(last)
    if parts is None:
        return [prefix]
    return [f"{head}.{p}" if head else p for p in parts]


def is_quantized_layer(prefix: str, not_convert: Iterable[str] = (), only: Iterable[str] | None = None) -> bool:
    """Whether the linear at ``prefix`` is quantized in the checkpoint.

    ``not_convert`` (AWQ's ``modules_to_not_convert``): name fragments of
    dense layers. ``only`` (GPTQ's ``modules_in_block_to_quantize``): names
    within a block (``self_attn.q_proj``) of the quantized ones. A fused layer
    must be all quantized or all dense.
    """
    names = component_names(prefix)
    not_convert = [s for s in not_convert if s]
    flags = []
    for name in names:
        quantized = not any(s in name for s in not_convert)
        if only is not None:
            quantized = quantized and any(name == o or name.endswith("." + o) for o in only)
        flags.append(quantized)
    if len(set(flags)) > 1:
        raise ValueError(
            f"{prefix} fuses {', '.join(names)}, but the checkpoint quantizes only some of them "
            f"({dict(zip(names, flags))}); all parts of a fused layer must be quantized alike"
        )
    return flags[0]


def checked_parts(layer_name: str, output_partition_sizes: list[int], multiple: int, what: str) -> None:
    for size in output_partition_sizes:
        if size % multiple:
            raise ValueError(
                f"{layer_name}: output partition of {size} features is not a multiple of {multiple} ({what})"
            )
