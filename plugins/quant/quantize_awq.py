"""AWQ: activation-aware weight scaling (Lin et al., 2023), written as AWQ GEMM checkpoints.

A few input channels carry much larger activations than the rest; their
weights matter most. AWQ multiplies those weight columns by s > 1 before
rounding (less relative rounding error) and divides the activations by s,
folding 1/s into the operation that produces them, so the float network is
unchanged:

    y = W x = (W diag(s)) (diag(s)^-1 x)

For each group of linears sharing an input (Llama family: q/k/v after
input_layernorm, gate/up after post_attention_layernorm, down after up, o
after v when v's outputs map one to one onto o's inputs, i.e. no GQA):

1. s_x = mean |x| per input channel over the calibration tokens;
2. grid search alpha over 20 points in [0, 1]: s = s_x^alpha / sqrt(max * min),
   keeping the s that minimises the summed output MSE of the group's linears
   with quantized scaled weights (alpha = 0 is plain round-to-nearest);
3. fold: previous norm weight (or previous linear's output rows) /= s;
   the group's weight columns *= s;
4. clipping search (not for q/k, whose errors pass through softmax): per output
   row and group, shrink the clip range max|w| by up to 50% where that lowers
   the group's partial-output error;
5. group-wise asymmetric 4-bit round-to-nearest (AWQ's grid: [min, max] of the
   group, zero = -round(min / scale)).
"""

from __future__ import annotations

from pathlib import Path

import torch

from plugins.quant.calibration import (
    input_hooks,
    linear_modules,
    quantize_model_dir,
    summary,
)
from plugins.quant.packing import (
    QuantizedWeight,
    awq_tensors,
    check_out_dir,
    write_checkpoint,
)

BITS = 4
N_GRID = 20
MAX_SHRINK = 0.5
SEARCH_TOKENS = 4096  # token rows kept per linear for the scale search
CLIP_TOKENS = 512  # token rows used by the clipping search
CLIP_ROWS = 256  # output rows per chunk of the clipping search (bounds memory)

# (module producing the input, linears that read it) for Llama-family decoder layers.
SCALE_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
NO_CLIP = ("q_proj", "k_proj")


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    if k % gs:
        raise ValueError(f"group_size={group_size} must divide in_features={k}")
    return w.reshape(n, k // gs, gs)


def awq_params(wg: torch.Tensor, bits: int = BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) for each [..., group] of wg: asymmetric over [min, max]; scales are fp16 values."""
    maxq = 2**bits - 1
    wmax, wmin = wg.amax(-1), wg.amin(-1)
    scale = ((wmax - wmin).clamp(min=1e-5) / maxq).clamp(max=65504.0).to(torch.float16).to(torch.float32)
    zero = (-torch.round(wmin / scale)).clamp(0, maxq)
    return scale, zero


def fake_quantize(w: torch.Tensor, group_size: int, bits: int = BITS) -> torch.Tensor:
    """w [..., K] quantized and dequantized with AWQ's group-wise grid."""
    maxq = 2**bits - 1
    wg = w.reshape(*w.shape[:-1], -1, w.shape[-1] if group_size == -1 else group_size)
    scale, zero = awq_params(wg, bits)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, maxq)
    return ((q - zero[..., None]) * scale[..., None]).reshape(w.shape)


def awq_quantize(weight: torch.Tensor, group_size: int, bits: int = BITS) -> QuantizedWeight:
    """Round-to-nearest codes of weight [N, K] on AWQ's grid."""
    maxq = 2**bits - 1
    wg = _grouped(weight.detach().to(torch.float32), group_size)
    scale, zero = awq_params(wg, bits)
    codes = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, maxq)
    k = weight.shape[1]
    g_idx = torch.arange(k) // wg.shape[-1]
    return QuantizedWeight(codes.reshape(weight.shape).to(torch.int64).cpu(), scale.t().contiguous().cpu(),
                           zero.t().to(torch.int64).contiguous().cpu(), g_idx, bits)


def search_scale(x: torch.Tensor, x_mean: torch.Tensor, weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """The per-input-channel scale s [K] minimising sum_i ||(x / s) Q(W_i s)^T - x W_i^T||^2."""
    x = x.to(torch.float32)
    refs = [x @ w.t() for w in weights]
    best_loss, best = float("inf"), torch.ones_like(x_mean)
    for alpha in torch.linspace(0, 1, N_GRID).tolist():
        s = x_mean.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        xs = x / s
        loss = sum(float((xs @ fake_quantize(w * s, group_size).t() - r).pow(2).mean()) for w, r in zip(weights, refs))
        if loss < best_loss:
            best_loss, best = loss, s
    return best


def search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per (row, group) clip bound for weight [N, K] minimising the group's partial-output error."""
    step = max(1, x.shape[0] // CLIP_TOKENS)
    xg = x[::step][:CLIP_TOKENS].to(torch.float32)
    wg_all = _grouped(weight.to(torch.float32), group_size)
    xg = xg.reshape(xg.shape[0], wg_all.shape[1], wg_all.shape[2])  # [T, G, gs]
    bounds = []
    for r0 in range(0, wg_all.shape[0], CLIP_ROWS):
        wg = wg_all[r0 : r0 + CLIP_ROWS]  # [n, G, gs]
        ref = torch.einsum("tgk,ngk->ntg", xg, wg)
        full = wg.abs().amax(-1, keepdim=True)
        best_err = torch.full(wg.shape[:2], float("inf"), device=wg.device)
        best = full.clone()
        for i in range(int(MAX_SHRINK * N_GRID)):
            bound = full * (1 - i / N_GRID)
            clipped = torch.maximum(torch.minimum(wg, bound), -bound)
            out = torch.einsum("tgk,ngk->ntg", xg, fake_quantize(clipped, -1))
            err = (out - ref).pow(2).mean(1)  # [n, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[..., None], bound, best)
        bounds.append(best)
    return torch.cat(bounds)  # [N, G, 1]


def _fold(prev: torch.nn.Module, s: torch.Tensor) -> None:
    """Divide what `prev` outputs by s: a norm's weight, or a linear's output rows (and bias)."""
    if isinstance(prev, torch.nn.Linear):
        prev.weight.data.div_(s[:, None].to(prev.weight))
        if prev.bias is not None:
            prev.bias.data.div_(s.to(prev.bias))
        return
    weight = getattr(prev, "weight", None)
    if weight is None or weight.shape != s.shape:
        raise ValueError(f"cannot fold AWQ scales into {type(prev).__name__}")
    weight.data.div_(s.to(weight))


def make_layer_quantizer(group_size: int, clip: bool):
    """The per-decoder-layer step for `quantize_model_dir`."""

    def quantize_layer(layer, stream):
        linears = linear_modules(layer)
        abs_sum = {n: 0.0 for n in linears}
        counts = dict.fromkeys(linears, 0)
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        per_sample = max(1, SEARCH_TOKENS // max(len(stream.hidden), 1))

        def collect(name, x):
            x = x.to(torch.float32)
            abs_sum[name] = abs_sum[name] + x.abs().sum(0)
            counts[name] += x.shape[0]
            rows[name].append(x[:: max(1, x.shape[0] // per_sample)][:per_sample])

        with input_hooks(linears, collect):
            stream.run(layer)
        xs = {n: torch.cat(r) for n, r in rows.items()}
        modules = dict(layer.named_modules())
        for prev_name, names in SCALE_GROUPS:
            if prev_name not in modules or not all(n in linears for n in names):
                continue
            prev = modules[prev_name]
            if isinstance(prev, torch.nn.Linear) and prev.out_features != linears[names[0]].in_features:
                continue  # e.g. v -> o under GQA: no one-to-one channel map
            s = search_scale(xs[names[0]], abs_sum[names[0]] / counts[names[0]],
                             [linears[n].weight.data.float() for n in names], group_size)
            _fold(prev, s)
            for n in names:
                linears[n].weight.data.mul_(s[None, :].to(linears[n].weight))
                xs[n] = xs[n] / s
        found, errors = {}, []
        for name, linear in linears.items():
            w = linear.weight.data.float()
            if clip and not name.endswith(NO_CLIP):
                bound = search_clip(w, xs[name], group_size)
                w = torch.maximum(torch.minimum(_grouped(w, group_size), bound), -bound).reshape(w.shape)
            qw = awq_quantize(w, group_size)
            dequantized = qw.dequantize().to(w)
            ref = xs[name] @ linear.weight.data.float().t()
            errors.append(float((xs[name] @ dequantized.t() - ref).norm() / ref.norm().clamp(min=1e-30)))
            linear.weight.data.copy_(dequantized)
            found[name] = qw
        return found, errors

    return quantize_layer


def check_options(bits: int, group_size: int) -> None:
    if bits != 4:
        raise ValueError(f"bits must be 4 for AWQ (GEMM packs 4-bit codes), got {bits}")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"group_size must be -1 (one group per row) or >= 1, got {group_size}")


def quantize(model_dir, *, bits=4, group_size=128, clip=True, **calibration):
    """Quantize a model directory in memory; see `calibration.quantize_model_dir` for `calibration`."""
    check_options(bits, group_size)
    return quantize_model_dir(model_dir, make_layer_quantizer(group_size, clip), **calibration)


def quantization_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": BITS, "group_size": group_size, "zero_point": True, "version": "gemm"}


def quantize_checkpoint(
    model_dir: Path,
    out_dir: Path,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    desc_act: bool = False,
    damp_percent: float | None = None,
    clip: bool = True,
    calibration: str | Path | None = None,
    num_samples: int = 128,
    seq_len: int = 512,
    device: str = "cpu",
    ppl_samples: int = 16,
) -> dict:
    """AWQ-quantize `model_dir` and write an AWQ GEMM checkpoint to `out_dir`.

    `sym`, `desc_act` and `damp_percent` are GPTQ options: AWQ rejects them.

    Returns:
        The summary (layers quantized, seconds, per-layer relative output
        error, calibration perplexity before/after).
    """
    if sym:
        raise ValueError("sym must be False for AWQ: its checkpoints always carry zero points")
    if desc_act:
        raise ValueError("desc_act is a GPTQ option; AWQ does not reorder columns")
    if damp_percent is not None:
        raise ValueError("damp_percent is a GPTQ option; AWQ has no Hessian to dampen")
    check_out_dir(model_dir, out_dir)
    result = quantize(model_dir, bits=bits, group_size=group_size, clip=clip, calibration=calibration,
                      num_samples=num_samples, seq_len=seq_len, device=device, ppl_samples=ppl_samples)
    save(result, model_dir, out_dir, group_size=group_size)
    return summary("awq", result, Path(out_dir))


def save(result, model_dir, out_dir, *, group_size) -> None:
    packed = {}
    for prefix, qw in result.weights.items():
        packed.update(awq_tensors(prefix, qw))
    write_checkpoint(Path(model_dir), Path(out_dir), result.model, packed, set(result.weights),
                     quantization_config(group_size))
