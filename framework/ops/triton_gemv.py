"""Small-M linear layers (decode, 1..8 tokens) as a weight-streaming GEMV in Triton.

``y[M, N] = x[M, K] @ W[N, K]^T (+ b)`` with W row-major, as
``UnquantizedLinearMethod`` stores it. At M <= 8 the product is bound by
reading W once (2 bytes a weight in bf16), so each program owns ``BLOCK_N``
output features, walks K in ``BLOCK_K`` tiles (loads contiguous along K) and
serves all M rows from that one read. Two inner loops, picked per config:

* ``fma``: fp32 multiply-adds into a ``[BLOCK_M, BLOCK_N, BLOCK_K]``
  register accumulator (``[BLOCK_N, BLOCK_K]`` at M == 1), summed over K once
  at the end (no per-step reductions). Registers grow with BLOCK_M: best for
  M of 1 or 2.
* ``dot``: ``W_tile @ x_tile^T`` on the tensor cores (x padded to 16 rows by
  masked loads), fp32 accumulation; the compiler pipelines the weight loads
  ``num_stages`` deep. fp32 inputs use ``input_precision="ieee"``.

When ``cdiv(N, BLOCK_N)`` programs would not fill the GPU, a config splits K
into ``split`` slices: each writes fp32 partial sums to a workspace
``[split, M, N]`` that a second kernel adds up with the bias (deterministic,
no atomics, no memset). Every launch is device work on buffers sized by the
shapes only, so it can be captured in a CUDA graph; configs come from a fixed
table or a heuristic (``framework.ops.gemv_configs``; never timed at run time).

Arithmetic: products and sums in fp32 (fused multiply-adds: ``enable_fp_fusion``
is set, Triton 3.10 turns it off by default), the bias added in fp32, the
output rounded once, as cuBLAS does for ``F.linear``. ``gemv_silu_mul`` computes
``down(silu(gate) * up)`` from ``gate_up [M, 2I]`` with the SiLU-and-mul in the
load prologue, rounded where ``SiluAndMul`` rounds (silu in fp32 cast to the
dtype, the product in fp32 cast again), so it equals ``SiluAndMul`` followed by
``gemv`` up to the summation order. ``gemv_rmsnorm`` computes
``linear(RMSNorm(x + residual))`` and ``x + residual`` (the decoder layer's
norm before qkv and gate_up): each program first walks its rows once to get
their mean squares, then applies the norm in the load prologue, rounded where
``RMSNorm`` rounds, so it equals ``RMSNorm`` followed by ``gemv`` up to the
summation orders (of the mean square too: a normalised element may round one
ulp apart), and the new residual bit for bit.

On CUDA the layers take the GEMV only while decode CUDA graphs are made
(``building_graphs``): a replay costs no host time, while an eager step of a
few rows is bound by kernel launches, and a Triton launch costs the host
several times what cuBLAS's does (on an H200, an eager batch-1 step of the
8B shape: 14.5 ms with the GEMV against about 10.4 without).
``FRAMEWORK_TRITON_GEMV_EAGER=1`` takes it in eager steps too. On the CPU
(the Triton interpreter, tests) it is taken whenever it applies.

``FRAMEWORK_TRITON_GEMV=0`` in the environment (or ``set_enabled(False)``)
sends the layers back to ``F.linear`` for A/B measurement;
``FRAMEWORK_TRITON_GEMV_SILU=0`` keeps the GEMV but not the fused MLP tail.
``FRAMEWORK_TRITON_GEMV_NORM=0`` keeps RMSNorm apart from the next GEMV
(``benchmarks/check_gemv.py --norm-only`` times both; on an H200 the fused
pair saves about 70 us per batch-1 decode step of the 8B shape).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from framework.ops import pdl
from framework.ops.gemv_configs import NORM_TUNED, SILU_TUNED, Config, choose_config, table_entry
from framework.ops.pdl import pdl_start
from framework.ops.split_k import arrival_counters, sum_splits

MAX_M = 8  # the layers use the GEMV up to this many rows (tokens)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_enabled = os.environ.get("FRAMEWORK_TRITON_GEMV", "1") != "0"
_fuse_silu_mul = os.environ.get("FRAMEWORK_TRITON_GEMV_SILU", "1") != "0"
_fuse_norm = os.environ.get("FRAMEWORK_TRITON_GEMV_NORM", "1") != "0"
_in_eager_steps = os.environ.get("FRAMEWORK_TRITON_GEMV_EAGER", "0") == "1"
_building_graphs = 0  # > 0 while decode CUDA graphs are warmed up and captured


@contextlib.contextmanager
def building_graphs():
    """While decode graphs are warmed up and captured: the layers take the GEMV on CUDA tensors."""
    global _building_graphs
    _building_graphs += 1
    try:
        yield
    finally:
        _building_graphs -= 1


def set_enabled(enabled: bool, fuse_silu_mul: bool | None = None, fuse_norm: bool | None = None) -> None:
    """Turn the GEMV dispatch of the layers (and, if given, the fused SiLU-mul MLP tail or the fused
    RMSNorm prologue) on or off."""
    global _enabled, _fuse_silu_mul, _fuse_norm
    _enabled = bool(enabled)
    if fuse_silu_mul is not None:
        _fuse_silu_mul = bool(fuse_silu_mul)
    if fuse_norm is not None:
        _fuse_norm = bool(fuse_norm)


@triton.jit
def _act_tile(
    x_ptr, rows, cols, stride_xm, K, mask, SILU: tl.constexpr,
    r_ptr, stride_rm, nw_ptr, rstd, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """``x[rows, cols]`` in x's dtype, rounded as torch rounds, with SILU: ``silu(x[rows, cols]) * x[rows, K + cols]``;
    with NORM: ``nw[cols] * (h * rstd)`` for ``h = x (+ residual)[rows, cols]`` (``RMSNorm``'s rounding points)."""
    ptrs = x_ptr + rows * stride_xm + cols
    a = tl.load(ptrs, mask=mask, other=0.0)
    if SILU:
        gate = a.to(tl.float32)
        up = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(a.dtype)
        a = (silu.to(tl.float32) * up).to(a.dtype)
    if NORM:
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + rows * stride_rm + cols, mask=mask, other=0.0)
            a = (a.to(tl.float32) + r.to(tl.float32)).to(a.dtype)
        normed = (a.to(tl.float32) * rstd).to(a.dtype)
        nw = tl.load(nw_ptr + cols, mask=cols < K, other=0.0)
        a = (nw.to(tl.float32) * normed.to(tl.float32)).to(a.dtype)
    return a


@triton.jit
def _row_rstd(
    x_ptr, r_ptr, h_ptr, stride_xm, stride_rm, stride_hm, M, K, eps,
    pid, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``rsqrt(mean(h**2) + eps)`` per row (fp32 ``[BLOCK_M]``, 0 on padding rows) of ``h = x (+ residual)``
    rounded to x's dtype, over all K; the program with ``pid == 0`` also stores h (the new residual stream)."""
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs = tl.arange(0, BLOCK)
    ss = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
    for k in range(0, K, BLOCK):
        cols = k + offs
        mask = m_mask[:, None] & (cols < K)[None, :]
        h = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + offs_m[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
            if pid == 0:
                tl.store(h_ptr + offs_m[:, None] * stride_hm + cols[None, :], h, mask=mask)
        hf = h.to(tl.float32)
        ss += hf * hf
    rstd = tl.rsqrt(tl.sum(ss, axis=1) / K + eps)
    return tl.where(m_mask, rstd, 0.0)  # padding rows: 0, not rsqrt(eps) (inf at eps 0, and 0 * inf is NaN)


# fmt: off
@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] activations (SILU: [M, 2K] gate | up), unit last stride
    w_ptr,  # [N, K] weight, unit last stride
    b_ptr,  # [N] bias (read only if HAS_BIAS)
    out_ptr,  # [M, N] output in x dtype (row stride stride_om), or fp32 [S, M, N] partial sums (SPLIT)
    final_ptr,  # [M, N] output (row stride stride_om) that the last split program writes (SERIAL)
    cnt_ptr,  # int32 [>= cdiv(N, BLOCK_N)] zeroed arrival counters, one per output tile (SERIAL)
    M, N, K,
    stride_xm, stride_wn, stride_om,
    k_per_split,  # K elements per program along grid axis 1 (a multiple of BLOCK_K)
    BLOCK_M: tl.constexpr,  # power of two >= M (16 for DOT)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr,  # tensor-core inner loop; full-precision fp32 dot
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks along K
    SERIAL: tl.constexpr = False,  # SPLIT: the last program of a tile adds the partials (no second launch)
    r_ptr=None,  # [M, K] residual (NORM and HAS_RESIDUAL)
    nw_ptr=None,  # [K] RMSNorm weight (NORM)
    h_ptr=None,  # [M, K] x + residual, the new residual stream, written by program (0, 0) (NORM and HAS_RESIDUAL)
    stride_rm=0, stride_hm=0,
    eps=0.0,  # RMSNorm epsilon (NORM)
    NORM: tl.constexpr = False,  # the GEMV's input is RMSNorm(x (+ residual)), normalised in the load prologue
    HAS_RESIDUAL: tl.constexpr = False,
    NORM_BLOCK: tl.constexpr = 16,  # K elements a row per step of the statistics loop (a power of two)
    PDL: tl.constexpr = False,  # a programmatic dependent launch (framework.ops.pdl)
):
# fmt: on
    pdl_start(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if NORM:  # every program recomputes the rows' statistics over all of K (a few KiB from L2): no extra launch
        rstd = _row_rstd(
            x_ptr, r_ptr, h_ptr, stride_xm, stride_rm, stride_hm, M, K, eps,
            pid_n + pid_k, HAS_RESIDUAL, BLOCK_M, NORM_BLOCK,
        )  # fmt: skip
    else:
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        cols = k + offs_k
        if EVEN_K:
            w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None], other=0.0)
            k_mask = offs_k < BLOCK_K
        else:
            k_mask = cols < K
            w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT:  # [BLOCK_N, BLOCK_K] @ [BLOCK_K, BLOCK_M]
            xt = _act_tile(
                x_ptr, offs_m[None, :], cols[:, None], stride_xm, K, m_mask[None, :] & k_mask[:, None], SILU,
                r_ptr, stride_rm, nw_ptr, rstd[None, :], NORM, HAS_RESIDUAL,
            )  # fmt: skip
            if IEEE:
                acc = tl.dot(w, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(w.to(xt.dtype), xt, acc)
        elif BLOCK_M == 1:
            xk = _act_tile(
                x_ptr, 0, cols, stride_xm, K, k_mask, SILU, r_ptr, stride_rm, nw_ptr, tl.sum(rstd, 0), NORM, HAS_RESIDUAL
            )
            acc += w.to(tl.float32) * xk.to(tl.float32)[None, :]
        else:
            xk = _act_tile(
                x_ptr, offs_m[:, None], cols[None, :], stride_xm, K, m_mask[:, None] & k_mask[None, :], SILU,
                r_ptr, stride_rm, nw_ptr, rstd[:, None], NORM, HAS_RESIDUAL,
            )  # fmt: skip
            acc += w.to(tl.float32)[None, :, :] * xk.to(tl.float32)[:, None, :]
    # y^T [BLOCK_N, BLOCK_M] (DOT) or y [BLOCK_M, BLOCK_N]: address both through (n, m) offsets
    if DOT:
        y = acc
        on = offs_n[:, None]
        om = offs_m[None, :]
    else:
        if BLOCK_M == 1:
            y = tl.sum(acc, axis=1)[None, :]
        else:
            y = tl.sum(acc, axis=2)
        on = offs_n[None, :]
        om = offs_m[:, None]
    mask = (om < M) & (on < N)
    if SPLIT:
        tl.store(out_ptr + (pid_k * M + om) * N + on, y, mask=mask)
        if SERIAL:
            # The last of the tile's programs to arrive (counter bumped after a CTA barrier, acquire-release)
            # adds the partials in split order, so the sum is deterministic, and puts the counter back to 0.
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == tl.num_programs(1) - 1:
                tot = tl.zeros_like(y)
                for s in range(tl.num_programs(1)):
                    tot += tl.load(out_ptr + (s * M + om) * N + on, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    tot += tl.load(b_ptr + on, mask=on < N, other=0.0).to(tl.float32)
                tl.store(final_ptr + om * stride_om + on, tot.to(final_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + on, mask=on < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + om * stride_om + on, y.to(out_ptr.dtype.element_ty), mask=mask)


# Elements a row that the RMSNorm statistics loop reads per step, over all BLOCK_M rows (registers bound it).
NORM_STAT_ELEMS = 4096


# -- the ops ---------------------------------------------------------------------------


def applies(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = False, norm: bool = False
) -> bool:
    """Whether the layers should run the GEMV (``silu``: ``gemv_silu_mul``, ``norm``: ``gemv_rmsnorm``) on
    ``x [..., K]``, ``weight [N, K]``."""
    k = x.shape[-1] // 2 if silu else x.shape[-1]
    return (
        _enabled
        and (not x.is_cuda or _building_graphs > 0 or _in_eager_steps)
        and (_fuse_silu_mul or not silu)
        and (_fuse_norm or not norm)
        and x.shape[:-1].numel() <= MAX_M
        and x.dtype in DTYPES
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.shape[1] == k
        and (not silu or x.shape[-1] % 2 == 0)
        and (bias is None or (bias.dtype == x.dtype and bias.shape == weight.shape[:1]))
        and table_entry((x.shape[:-1].numel(), weight.shape[0], k), silu, norm) is not None
    )


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K]; got shape {tuple(x.shape)}")
    if x.shape[0] > MAX_M:
        raise ValueError(f"x.shape[0]={x.shape[0]} is over the GEMV limit of {MAX_M} rows")
    if x.dtype not in DTYPES:
        raise ValueError(f"x.dtype={x.dtype} is not supported; it must be float32, float16 or bfloat16")
    if weight.dim() != 2 or weight.shape[1] != k or weight.dtype != x.dtype:
        raise ValueError(f"weight must be {x.dtype} [N, {k}]; got {weight.dtype} {tuple(weight.shape)}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be {x.dtype} [{weight.shape[0]}]; got {bias.dtype} {tuple(bias.shape)}")


# Split-K partial sums are added by the last program of each output tile, with the arrival counters of
# framework.ops.split_k (SERIAL_REDUCE; False or FRAMEWORK_GEMV_SERIAL_REDUCE=0: by split_k.sum_splits, a
# second launch, as also during a CUDA-graph capture that finds no counters).
SERIAL_REDUCE = os.environ.get("FRAMEWORK_GEMV_SERIAL_REDUCE", "1") != "0"


def _launch(x, weight, bias, out, k: int, silu: bool, config: Config | None, norm: tuple | None = None) -> torch.Tensor:
    """One GEMV launch (plus the split reduction when it needs one); ``norm``: ``(residual, norm_weight, eps,
    new_residual)`` for ``gemv_rmsnorm`` (x, residual and new_residual with a unit last stride)."""
    m, n = x.shape[0], weight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {x.dtype} [{m}, {n}] with a unit last stride; got {out.dtype} {tuple(out.shape)}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    cfg = config or choose_config(m, n, k, x.device)
    per = triton.cdiv(triton.cdiv(k, max(1, cfg.split)), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, per)
    target = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    block_m = 16 if cfg.dot else triton.next_power_of_2(m)
    tiles = triton.cdiv(n, cfg.block_n)
    counters = arrival_counters(x.device, tiles) if splits > 1 and SERIAL_REDUCE else None
    residual, norm_weight, eps, new_residual = norm or (None, x, 0.0, None)
    r = residual if residual is not None else x
    h = new_residual if new_residual is not None else x
    _gemv_kernel[(tiles, splits)](
        x, weight, bias if bias is not None else x, target, out, counters if counters is not None else out,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0), per,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT=cfg.dot, IEEE=x.dtype == torch.float32,
        SPLIT=splits > 1, HAS_BIAS=bias is not None, SILU=silu, EVEN_K=k % cfg.block_k == 0,
        SERIAL=counters is not None,
        r_ptr=r, nw_ptr=norm_weight, h_ptr=h, stride_rm=r.stride(0), stride_hm=h.stride(0), eps=float(eps),
        NORM=norm is not None, HAS_RESIDUAL=residual is not None,
        NORM_BLOCK=min(triton.next_power_of_2(k), max(16, NORM_STAT_ELEMS // block_m)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True,
        **pdl.launch_args(x.device, m),
    )  # fmt: skip
    if splits > 1 and counters is None:
        sum_splits(target, out, bias)
    return out


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few rows, reading the weight once.

    Args:
        x: ``[M, K]`` activations, ``M <= MAX_M``; float32, float16 or bfloat16.
        weight: ``[N, K]`` in x's dtype, unit last stride.
        bias: optional ``[N]`` in x's dtype.
        out: optional ``[M, N]`` output buffer (unit last stride).
        config: a ``Config`` to run (default: ``TUNED``, else ``heuristic_config``).

    Returns:
        ``[M, N]`` in x's dtype.
    """
    _check(x, weight, bias, x.shape[-1] if x.dim() == 2 else -1)
    return _launch(x, weight, bias, out, x.shape[1], False, config)


def gemv_silu_mul(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``F.linear(silu(gate) * up, weight, bias)`` with ``gate_up = [gate | up]`` (the SwiGLU MLP's down projection).

    Args:
        gate_up: ``[M, 2I]``, ``M <= MAX_M`` (the merged gate/up projection's output).
        weight: ``[N, I]`` down-projection weight in gate_up's dtype.
        bias, out, config: as for ``gemv``.

    Returns:
        ``[M, N]`` in gate_up's dtype.
    """
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be 2-D [M, 2I] with an even last dim; got shape {tuple(gate_up.shape)}")
    inter = gate_up.shape[1] // 2
    _check(gate_up, weight, bias, inter)
    if config is None and gate_up.is_cuda:
        config = SILU_TUNED.get((gate_up.shape[0], weight.shape[0], inter))
    return _launch(gate_up, weight, bias, out, inter, True, config)


def gemv_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: Config | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.linear(RMSNorm(x + residual), weight, bias)`` and ``x + residual``, the norm in the GEMV's load prologue.

    ``h = x + residual`` is rounded to the dtype, its mean square taken in fp32 over the whole row, the
    normalised row cast to the dtype and then multiplied by ``norm_weight`` (the product cast again): the
    rounding points of ``framework.layers.RMSNorm``. Every program recomputes its rows' mean squares (no
    extra launch); program (0, 0) writes ``h``. Config: ``NORM_TUNED``, else as for ``gemv``.

    Args:
        x: ``[M, K]`` activations, ``M <= MAX_M``; float32, float16 or bfloat16.
        residual: ``[M, K]`` residual stream in x's dtype, or None (then ``h = x``).
        norm_weight: ``[K]`` RMSNorm weight in x's dtype.
        eps: added to the mean square before the reciprocal square root (>= 0).
        weight, bias, out, config: as for ``gemv``.
        residual_out: optional ``[M, K]`` buffer (contiguous) for ``x + residual`` (ignored without a residual).

    Returns:
        ``(out [M, N], new_residual [M, K])``; ``new_residual`` is ``x`` itself when ``residual`` is None.
    """
    _check(x, weight, bias, x.shape[-1] if x.dim() == 2 else -1)
    k = x.shape[1]
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must be {x.dtype} {tuple(x.shape)}; got {residual.dtype} {tuple(residual.shape)}")
    if norm_weight.shape != (k,) or norm_weight.dtype != x.dtype:
        raise ValueError(f"norm_weight must be {x.dtype} [{k}]; got {norm_weight.dtype} {tuple(norm_weight.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps={eps} must be >= 0")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    if residual is None:
        new_residual = x
    elif residual_out is None:
        new_residual = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif residual_out.shape != x.shape or residual_out.dtype != x.dtype or not residual_out.is_contiguous():
        raise ValueError(f"residual_out must be contiguous {x.dtype} {tuple(x.shape)}; got {residual_out.dtype} "
                         f"{tuple(residual_out.shape)}")
    else:
        new_residual = residual_out
    if config is None and x.is_cuda:
        config = NORM_TUNED.get((x.shape[0], weight.shape[0], k))
    out = _launch(x, weight, bias, out, k, False, config, (residual, norm_weight.contiguous(), eps, new_residual))
    if residual is not None and (k == 0 or weight.shape[0] == 0) and x.shape[0]:
        torch.add(x, residual, out=new_residual)  # no program ran to write it
    return out, new_residual
