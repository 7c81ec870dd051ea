"""An independent writer of GPTQ, AWQ and SqueezeLLM checkpoints, for the loader tests.

Written from the public format descriptions, deliberately without the
plugin's code (no shared helpers, numpy bit loops instead of torch shifts):

GPTQ (AutoGPTQ "gptq" v1 format; GPTQModel "gptq_v2" drops the -1)
    qweight int32 [K/pack, N]: word (r, n) holds q[k = r*pack + j, n] << (bits*j), j = 0..pack-1
    qzeros  int32 [G, N/pack]: word (g, c) holds (zero[g, c*pack + j] - 1) << (bits*j)
    scales  fp16  [G, N];  g_idx int32 [K] (act-order: g_idx[perm[i]] = i // group_size)
AWQ GEMM (AutoAWQ WQLinear_GEMM)
    qweight int32 [K, N/8]: word (k, c) holds q[k, c*8 + order[i]] << (4*i), order = 0 2 4 6 1 3 5 7
    qzeros  int32 [G, N/8]: the same for zero[g, :] (no offset); scales fp16 [G, N]
SqueezeLLM (dense)
    qweight int32 [K/8, N] packed along K like GPTQ; lookup_table fp16 [N, 16]

Each quantizer is round-to-nearest; each returns the checkpoint tensors and
the dequantized fp32 weight ``[N, K]`` the checkpoint stands for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# linears that read the same input share one act-order permutation (as GPTQ's shared Hessian gives)
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def _to_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def pack_words(values: np.ndarray, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """Pack the last axis of ``values`` (ints in [0, 2**bits)) ``32 // bits`` per word, lowest bits first.

    ``order[i]``: which of the word's values goes to slot i (AWQ); default in order.
    """
    pack = 32 // bits
    rows, cols = values.shape
    assert cols % pack == 0 and values.min() >= 0 and values.max() < 2**bits
    order = order or list(range(pack))
    words = np.zeros((rows, cols // pack), dtype=np.uint64)
    for c in range(cols // pack):
        for slot in range(pack):
            words[:, c] |= values[:, c * pack + order[slot]].astype(np.uint64) << np.uint64(bits * slot)
    return _to_int32(words)


def act_order_g_idx(k: int, group_size: int, seed: int) -> np.ndarray:
    """GPTQ act-order: input ``perm[i]`` is quantized i-th, so it belongs to group ``i // group_size``."""
    perm = np.random.default_rng(seed).permutation(k)
    g_idx = np.empty(k, dtype=np.int64)
    g_idx[perm] = np.arange(k) // group_size
    return g_idx


def quantize_minmax(w: np.ndarray, g_idx: np.ndarray, num_groups: int, bits: int, sym: bool):
    """Round-to-nearest with per-(group, output) min/max -> q [N, K], scales fp16 [G, N], zeros [G, N].

    Asymmetric zero points are kept in [1, 2**bits - 1] so the GPTQ v1 "zero - 1" fits.
    """
    maxq = 2**bits - 1
    n, k = w.shape
    q = np.zeros((n, k), dtype=np.int64)
    scales = np.zeros((num_groups, n), dtype=np.float16)
    zeros = np.zeros((num_groups, n), dtype=np.int64)
    for g in range(num_groups):
        cols = np.nonzero(g_idx == g)[0]
        block = w[:, cols]
        lo, hi = np.minimum(block.min(1), 0), np.maximum(block.max(1), 0)
        if sym:
            hi = np.maximum(np.abs(lo), hi)
            lo = -hi
        scale = ((hi - lo) / maxq).astype(np.float16).astype(np.float64)
        scale[scale == 0] = 1.0
        zero = np.full(n, 2 ** (bits - 1)) if sym else np.clip(np.round(-lo / scale), 1, maxq).astype(np.int64)
        q[:, cols] = np.clip(np.round(block / scale[:, None]) + zero[:, None], 0, maxq)
        scales[g], zeros[g] = scale, zero
    return q, scales, zeros


def dequantized(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray) -> torch.Tensor:
    """W[n, k] = (q[n, k] - zero[g_idx[k], n]) * scale[g_idx[k], n], in fp32."""
    s = torch.from_numpy(scales.astype(np.float32))[torch.from_numpy(g_idx)].t()
    z = torch.from_numpy(zeros.astype(np.float32))[torch.from_numpy(g_idx)].t()
    return (torch.from_numpy(q.astype(np.float32)) - z) * s


def gptq_tensors(w, bits, group_size, sym, g_idx=None, checkpoint_format="gptq"):
    """A float weight [N, K] -> ({qweight, qzeros, scales, g_idx}, dequantized W)."""
    w = w.double().numpy()
    k = w.shape[1]
    gs = k if group_size == -1 else group_size
    g_idx = np.arange(k) // gs if g_idx is None else g_idx
    q, scales, zeros = quantize_minmax(w, g_idx, k // gs, bits, sym)
    stored = zeros - 1 if checkpoint_format == "gptq" else zeros
    tensors = {
        "qweight": pack_words(np.ascontiguousarray(q), bits).t().contiguous(),  # q is [N, K]: pack K, then [K/pack, N]
        "qzeros": pack_words(stored, bits),
        "scales": torch.from_numpy(scales),
        "g_idx": torch.from_numpy(g_idx.astype(np.int32)),
    }
    return tensors, dequantized(q, scales, zeros, g_idx)


def awq_tensors(w, group_size):
    w = w.double().numpy()
    k = w.shape[1]
    gs = k if group_size == -1 else group_size
    g_idx = np.arange(k) // gs
    q, scales, zeros = quantize_minmax(w, g_idx, k // gs, 4, sym=False)
    tensors = {
        "qweight": pack_words(np.ascontiguousarray(q.T), 4, AWQ_PACK_ORDER),
        "qzeros": pack_words(zeros, 4, AWQ_PACK_ORDER),
        "scales": torch.from_numpy(scales),
    }
    return tensors, dequantized(q, scales, zeros, g_idx)


def squeezellm_tensors(w):
    """16-entry table per output channel (evenly spaced over its range, fp16), nearest entry per weight."""
    w = w.double().numpy()
    lut = np.linspace(w.min(1), w.max(1), 16, axis=1).astype(np.float16)  # [N, 16]
    idx = np.abs(w[:, :, None] - lut[:, None, :].astype(np.float64)).argmin(-1)  # [N, K]
    tensors = {
        "qweight": pack_words(np.ascontiguousarray(idx), 4).t().contiguous(),
        "lookup_table": torch.from_numpy(lut),
    }
    ref = torch.from_numpy(np.take_along_axis(lut.astype(np.float32), idx, 1))
    return tensors, ref


def quantize_checkpoint(
    src: Path, dst: Path, ref: Path, method: str, *, side_file: bool = False, seed: int = 0, **opts
):
    """Quantize every decoder linear of the checkpoint at ``src``.

    Writes the quantized checkpoint to ``dst`` (config.json with
    ``quantization_config``, or a quantize_config.json / quant_config.json
    beside it when ``side_file``) and the same model with the dequantized
    weights substituted, dense, to ``ref`` (the fp32 reference for transformers).
    """
    dense = {}
    for file in sorted(src.glob("*.safetensors")):
        dense.update(load_file(file))
    quantized, reference, perms = {}, {}, {}
    for name, tensor in dense.items():
        parts = name.split(".")
        linear = parts[-2] if len(parts) >= 2 else ""
        dense_layer = any(fragment in name for fragment in opts.get("modules_to_not_convert", ()))
        if dense_layer or not (name.endswith(".weight") and linear in LINEARS and ".layers." in name):
            quantized[name] = reference[name] = tensor
            continue
        base = name[: -len(".weight")]
        w = tensor.float()
        if method == "gptq":
            g_idx = None
            if opts.get("desc_act"):
                key = (base.rsplit(".", 1)[0], SHARED_INPUT.get(linear, linear))
                gs = w.shape[1] if opts["group_size"] == -1 else opts["group_size"]
                g_idx = perms.setdefault(key, act_order_g_idx(w.shape[1], gs, seed + len(perms)))
            tensors, deq = gptq_tensors(
                w, opts["bits"], opts["group_size"], opts.get("sym", True), g_idx, opts.get("checkpoint_format", "gptq")
            )
        elif method == "awq":
            tensors, deq = awq_tensors(w, opts["group_size"])
        else:
            tensors, deq = squeezellm_tensors(w)
        for key, value in tensors.items():
            quantized[f"{base}.{key}"] = value
        reference[name] = deq.to(tensor.dtype)
    for out, tensors in ((dst, quantized), (ref, reference)):
        out.mkdir(parents=True, exist_ok=True)
        for file in src.iterdir():
            if file.suffix != ".safetensors" and file.name != "model.safetensors.index.json":
                shutil.copy(file, out / file.name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    settings = quant_settings(method, **opts)
    config = json.loads((dst / "config.json").read_text())
    if side_file:
        side = "quantize_config.json" if method == "gptq" else "quant_config.json"
        (dst / side).write_text(json.dumps(settings))
    else:
        config["quantization_config"] = settings
    (dst / "config.json").write_text(json.dumps(config))
    return dst, ref


def quant_settings(method: str, **opts) -> dict:
    """The quantization settings as each tool writes them."""
    if method == "gptq":
        settings = {
            "quant_method": "gptq",
            "bits": opts["bits"],
            "group_size": opts["group_size"],
            "desc_act": bool(opts.get("desc_act", False)),
            "sym": bool(opts.get("sym", True)),
            "damp_percent": 0.01,
            "true_sequential": True,
        }
        if "checkpoint_format" in opts:
            settings["checkpoint_format"] = opts["checkpoint_format"]
        return settings
    if method == "awq":
        if opts.get("autoawq_file"):  # AutoAWQ's own quant_config.json names
            return {"zero_point": True, "q_group_size": opts["group_size"], "w_bit": 4, "version": "GEMM"}
        settings = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": opts["group_size"],
            "zero_point": True,
            "version": "gemm",
        }
        if "modules_to_not_convert" in opts:
            settings["modules_to_not_convert"] = opts["modules_to_not_convert"]
        return settings
    return {"quant_method": "squeezellm", "wbits": 4}
