"""GPTQ: Hessian-based error compensation (Frantar et al., 2022), written as AutoGPTQ v1 checkpoints.

For a linear layer y = W x (W: [N, K]) and calibration inputs X, GPTQ
quantizes W column by column and, after each column, spreads that column's
rounding error over the columns not yet quantized so that ||W X - Q X||
stays small:

    H    = 2 X X^T / n  (+ damp_percent * mean(diag H) * I)
    U    = upper Cholesky factor of H^-1
    for column k:  q_k = quant(w_k);  e = (w_k - q_k) / U[k, k];  w_{k+1:} -= e U[k, k+1:]

The sweep runs in blocks of columns (errors inside a block are applied at
once, the rest lazily at the block's end). Group parameters (scale, zero per
output row) are fixed when the sweep reaches a group's first column, from the
already-updated weights. With act-order (desc_act) columns are swept in
order of decreasing diag(H); g_idx then records each column's group.
Columns never activated (diag(H) = 0) are zeroed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from plugins.quant.calibration import (
    input_groups,
    input_hooks,
    linear_modules,
    quantize_model_dir,
    summary,
)
from plugins.quant.packing import (
    QuantizedWeight,
    check_out_dir,
    gptq_tensors,
    write_checkpoint,
)

BLOCK_COLUMNS = 128


def group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for the columns of w [N, g]; scales are fp16 values.

    Asymmetric: the grid spans [min(w, 0), max(w, 0)]; the zero is kept >= 1
    because the v1 format stores zero - 1 (a zero of 0 would wrap), widening
    the scale where needed. Symmetric: scale = 2 max|w| / maxq, zero = 2**(bits-1).
    """
    maxq = 2**bits - 1
    xmin = w.amin(1).clamp(max=0)
    xmax = w.amax(1).clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = _fp16_values((xmax - xmin) / maxq)
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
    zero = torch.round(-xmin / scale)
    low = zero < 1
    scale = torch.where(low, _fp16_values(xmax / (maxq - 1)), scale)
    zero = zero.clamp(1, maxq).to(torch.int64)
    return scale, zero


def _fp16_values(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (at least the smallest fp16 subnormal), kept as fp32."""
    return x.clamp(min=2.0**-24, max=65504.0).to(torch.float16).to(torch.float32)


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of one column w [N]."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    damp_percent: float = 0.01,
) -> QuantizedWeight:
    """Quantize weight [N, K] with GPTQ given H = 2 X X^T / n [K, K] (module docstring).

    Returns the codes, fp16-valued scales, zeros and g_idx in the original
    column order; `QuantizedWeight.dequantize()` is the quantized weight.
    """
    n_rows, k = weight.shape
    gs = k if group_size == -1 else group_size
    if k % gs:
        raise ValueError(f"group_size={group_size} must divide in_features={k}")
    maxq = 2**bits - 1
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if desc_act else torch.arange(k, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp_percent * torch.mean(torch.diag(H)))
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise ValueError(f"damp_percent={damp_percent} is too small: the Hessian is not positive definite") from exc

    codes = torch.zeros_like(W, dtype=torch.int64)
    scales = torch.zeros(k // gs, n_rows, device=W.device)
    zeros = torch.zeros(k // gs, n_rows, dtype=torch.int64, device=W.device)
    if group_size == -1:  # one group: its parameters come from the whole weight, before the sweep
        scales[0], zeros[0] = group_params(W, bits, sym)
        block = BLOCK_COLUMNS
    else:  # whole groups per block, so a group's parameters see its updated weights
        block = gs * max(1, BLOCK_COLUMNS // gs)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        Wb, Ub = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        errors = torch.zeros_like(Wb)
        for i in range(b1 - b0):
            col = b0 + i
            g = col // gs
            if group_size != -1 and col % gs == 0:
                scales[g], zeros[g] = group_params(Wb[:, i : i + gs], bits, sym)
            q = quantize_column(Wb[:, i], scales[g], zeros[g], maxq)
            codes[:, col] = q.to(torch.int64)
            err = (Wb[:, i] - scales[g] * (q - zeros[g])) / Ub[i, i]
            Wb[:, i:] -= err[:, None] * Ub[i, i:][None, :]
            errors[:, i] = err
        W[:, b1:] -= errors @ U[b0:b1, b1:]

    inverse = torch.argsort(perm)
    g_idx = (torch.arange(k, device=W.device) // gs)[inverse]
    return QuantizedWeight(codes[:, inverse].cpu(), scales.cpu(), zeros.cpu(), g_idx.cpu(), bits)


def relative_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(Q - W) X|| / ||W X|| on the calibration inputs, from H = 2 X X^T / n."""
    delta = (quantized - weight).to(hessian)
    num = (delta @ hessian * delta).sum()
    den = (weight.to(hessian) @ hessian * weight.to(hessian)).sum()
    return float((num / den.clamp(min=1e-30)).sqrt())


def make_layer_quantizer(bits: int, group_size: int, sym: bool, desc_act: bool, damp_percent: float):
    """The per-decoder-layer step for `quantize_model_dir` (true-sequential)."""

    def quantize_layer(layer, stream):
        linears = linear_modules(layer)
        found, errors = {}, []
        # true_sequential: each input group (q/k/v, o, gate/up, down) is calibrated
        # on inputs computed with the groups before it already quantized.
        for group in input_groups(layer, stream):
            sums = {name: 0.0 for name in group}
            counts = dict.fromkeys(group, 0)

            def accumulate(name, x, sums=sums, counts=counts):
                x = x.to(torch.float32)
                sums[name] = sums[name] + x.t() @ x
                counts[name] += x.shape[0]

            with input_hooks({n: linears[n] for n in group}, accumulate):
                stream.run(layer)
            for name in group:
                linear = linears[name]
                hessian = 2.0 * sums[name] / counts[name]
                qw = gptq_quantize(linear.weight.data, hessian, bits=bits, group_size=group_size,
                                   sym=sym, desc_act=desc_act, damp_percent=damp_percent)
                dequantized = qw.dequantize().to(linear.weight)
                errors.append(relative_error(linear.weight.data, dequantized, hessian))
                linear.weight.data.copy_(dequantized)
                found[name] = qw
        return found, errors

    return quantize_layer


def check_options(bits: int, group_size: int, damp_percent: float) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 for GPTQ, got {bits}")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"group_size must be -1 (one group per row) or >= 1, got {group_size}")
    if not 0 < damp_percent <= 1:
        raise ValueError(f"damp_percent must be in (0, 1], got {damp_percent}")


def quantize(model_dir, *, bits=4, group_size=128, sym=True, desc_act=False, damp_percent=0.01, **calibration):
    """Quantize a model directory in memory; see `calibration.quantize_model_dir` for `calibration`."""
    check_options(bits, group_size, damp_percent)
    step = make_layer_quantizer(bits, group_size, sym, desc_act, damp_percent)
    return quantize_model_dir(model_dir, step, **calibration)


def quantization_config(bits, group_size, sym, desc_act, damp_percent) -> dict:
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": damp_percent,
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": "gptq",
        "model_file_base_name": "model",
    }


def quantize_checkpoint(
    model_dir: Path,
    out_dir: Path,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    calibration: str | Path | None = None,
    num_samples: int = 128,
    seq_len: int = 512,
    device: str = "cpu",
    ppl_samples: int = 16,
) -> dict:
    """GPTQ-quantize `model_dir` and write an AutoGPTQ v1 checkpoint to `out_dir`.

    Returns:
        The summary (layers quantized, seconds, per-layer relative output
        error, calibration perplexity before/after).
    """
    options = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, damp_percent=damp_percent)
    check_out_dir(model_dir, out_dir)
    result = quantize(model_dir, **options, calibration=calibration, num_samples=num_samples,
                      seq_len=seq_len, device=device, ppl_samples=ppl_samples)
    save(result, model_dir, out_dir, **options)
    return summary("gptq", result, Path(out_dir))


def save(result, model_dir, out_dir, *, bits, group_size, sym, desc_act, damp_percent) -> None:
    packed = {}
    for prefix, qw in result.weights.items():
        packed.update(gptq_tensors(prefix, qw))
    config = quantization_config(bits, group_size, sym, desc_act, damp_percent)
    write_checkpoint(Path(model_dir), Path(out_dir), result.model, packed, set(result.weights), config,
                     extra_json={"quantize_config.json": config})
