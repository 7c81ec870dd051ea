"""Integer codes of quantized weights, their GPTQ / AWQ packings, and the checkpoint writer.

Both algorithms produce a `QuantizedWeight`: integer codes plus per-group
scales and zero points, with the invariant

    dequantize()[n, k] == scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n])

computed in fp32, where every scale is an fp16 value (the checkpoints store
fp16 scales, so the algorithms round scales to fp16 *before* choosing codes:
what they optimise is exactly what the file holds).

Packings (32 // bits codes per int32, code j of a word in bits [j*bits, (j+1)*bits)):

* GPTQ, AutoGPTQ "v1" (``checkpoint_format: gptq``):
  ``qweight`` int32 [K / pack, N]: word [r, n] holds codes[n, r*pack + j] in slot j
  (packed along input features); ``qzeros`` int32 [G, N / pack]: word [g, c]
  holds ``zeros[g, c*pack + j] - 1`` in slot j (v1 stores zero - 1, so readers
  add one back; zero 0 is therefore never produced); ``scales`` fp16 [G, N];
  ``g_idx`` int32 [K].
* AWQ GEMM: ``qweight`` int32 [K, N / 8] and ``qzeros`` int32 [G, N / 8],
  packed along output features in AWQ's interleaved order: slot i of word c
  holds column ``c*8 + AWQ_ORDER[i]``; zeros are stored as they are;
  ``scales`` fp16 [G, N].
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
MAX_SHARD_BYTES = 4 * 1024**3
# Top-level files of a model directory copied into the quantized one
# (tokenizer, generation config, chat template); weights and config.json are written anew.
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
               "quantize_config.json", "quant_config.json"}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class QuantizedWeight:
    """One linear layer's quantized weight (module docstring: the invariant).

    Attributes:
        codes: int64 [N, K], values in [0, 2**bits).
        scales: float32 [G, N], each an fp16 value.
        zeros: int64 [G, N], values in [0, 2**bits).
        g_idx: int64 [K], the group of each input feature.
        bits: bits per code.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K] the codes stand for."""
        scales = self.scales[self.g_idx].t()
        zeros = self.zeros[self.g_idx].t()
        return scales * (self.codes - zeros).to(torch.float32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int [R, C] along dim 0: word [r, c] holds values[r*pack + j, c] in slot j."""
    pack = 32 // bits
    if values.shape[0] % pack:
        raise ValueError(f"cannot pack {values.shape[0]} rows {pack} to a word")
    v = values.to(torch.int64).reshape(values.shape[0] // pack, pack, values.shape[1])
    shifts = (torch.arange(pack, dtype=torch.int64) * bits).view(1, pack, 1)
    return _to_int32((v << shifts).sum(1))


def pack_columns(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack int [R, C] along dim 1: slot j of word [r, c] holds values[r, c*pack + order[j]]."""
    pack = 32 // bits
    if values.shape[1] % pack:
        raise ValueError(f"cannot pack {values.shape[1]} columns {pack} to a word")
    v = values.to(torch.int64).reshape(values.shape[0], values.shape[1] // pack, pack)
    if order is not None:
        v = v[:, :, list(order)]
    shifts = (torch.arange(pack, dtype=torch.int64) * bits).view(1, 1, pack)
    return _to_int32((v << shifts).sum(2))


def gptq_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The AutoGPTQ v1 tensors of one linear layer (module docstring)."""
    return {
        f"{prefix}.qweight": pack_rows(qw.codes.t(), qw.bits),
        f"{prefix}.qzeros": pack_columns(qw.zeros - 1, qw.bits),
        f"{prefix}.scales": qw.scales.to(torch.float16),
        f"{prefix}.g_idx": qw.g_idx.to(torch.int32),
    }


def awq_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The AWQ GEMM tensors of one linear layer (module docstring)."""
    if qw.bits != 4:
        raise ValueError(f"AWQ GEMM packs 4-bit codes, got bits={qw.bits}")
    return {
        f"{prefix}.qweight": pack_columns(qw.codes.t(), 4, AWQ_ORDER),
        f"{prefix}.qzeros": pack_columns(qw.zeros, 4, AWQ_ORDER),
        f"{prefix}.scales": qw.scales.to(torch.float16),
    }


def checkpoint_dtypes(model_dir: Path) -> dict[str, torch.dtype]:
    """Name -> dtype of every tensor in a directory's safetensors files (headers only)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model_dir {model_dir} holds no *.safetensors weights")
    dtypes = {}
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                dtypes[name] = _SAFETENSORS_DTYPES.get(info["dtype"], torch.float32)
    return dtypes


def check_out_dir(model_dir: Path, out_dir: Path) -> None:
    if Path(out_dir).resolve() == Path(model_dir).resolve():
        raise ValueError("out_dir must differ from model_dir (the source would be overwritten)")


def write_checkpoint(
    model_dir: Path,
    out_dir: Path,
    model: torch.nn.Module,
    packed: dict[str, torch.Tensor],
    quantized_prefixes: set[str],
    quantization_config: dict,
    extra_json: dict[str, dict] | None = None,
) -> None:
    """Write a quantized Hugging Face directory.

    Args:
        model_dir: the source checkpoint (its tensor names and dtypes, config.json,
            tokenizer and generation config files).
        out_dir: destination (created; must differ from model_dir).
        model: the model whose non-quantized tensors (embeddings, norms, biases,
            lm_head) are written, each in its source dtype under its source name.
        packed: the quantized tensors (``<prefix>.qweight`` ...).
        quantized_prefixes: linear layers whose ``<prefix>.weight`` is replaced by `packed`.
        quantization_config: stored as config.json's ``quantization_config``.
        extra_json: more JSON files to write (e.g. quantize_config.json).
    """
    check_out_dir(model_dir, out_dir)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    dtypes = checkpoint_dtypes(model_dir)
    state = model.state_dict()
    tensors = {}
    for name, dtype in dtypes.items():
        if name.endswith(".weight") and name[: -len(".weight")] in quantized_prefixes:
            continue
        if name not in state:
            raise ValueError(f"checkpoint tensor {name!r} has no counterpart in the loaded model")
        tensors[name] = state[name].detach().to("cpu", dtype).contiguous()
    missing = {p for p in quantized_prefixes if f"{p}.weight" not in dtypes}
    if missing:
        raise ValueError(f"quantized layers not in the checkpoint: {sorted(missing)}")
    tensors.update({k: v.contiguous() for k, v in packed.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("*.safetensors")) + [out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    _save_sharded(tensors, out_dir)

    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name, content in (extra_json or {}).items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix in _COPIED_SUFFIXES and path.name not in _NOT_COPIED:
            shutil.copy2(path, out_dir / path.name)


def _save_sharded(tensors: dict[str, torch.Tensor], out_dir: Path) -> None:
    """One model.safetensors, or shards of at most MAX_SHARD_BYTES plus an index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
