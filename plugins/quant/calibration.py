"""Calibration data and the layer-by-layer pass that GPTQ and AWQ share.

The model is loaded with transformers in fp32 on the CPU. `LayerStream`
holds the inputs of one decoder layer for every calibration sample (hidden
states plus the keyword arguments the model passes each layer: rotary
cos/sin, mask, positions). An algorithm quantizes layer i from those inputs,
writes the dequantized weights back into the layer, and `advance` runs the
quantized layer to make the inputs of layer i + 1 -- so each layer is
calibrated on what the already-quantized layers before it produce, as in
GPTQ. Only the layer being worked on sits on the device.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_TEXT = Path(__file__).with_name("calibration_text.txt")


def read_calibration_text(path: str | Path | None = None) -> str:
    """The text of `path`, or the built-in English text when None."""
    path = Path(path) if path is not None else DEFAULT_TEXT
    if not path.is_file():
        raise ValueError(f"calibration file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"calibration file {str(path)!r} is empty")
    return text


def calibration_samples(tokenizer, text: str, num_samples: int, seq_len: int) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens, evenly spaced over the tokenized text.

    Windows overlap when the text is shorter than num_samples * seq_len; a text
    shorter than seq_len gives one window of the whole text. Deterministic.

    Returns:
        int64 [num_windows, seq_len'] (num_windows <= num_samples: duplicates dropped).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError("the calibration text is shorter than 2 tokens")
    seq_len = min(seq_len, len(ids))
    last = len(ids) - seq_len
    starts = sorted({round(i * last / max(num_samples - 1, 1)) for i in range(num_samples)})
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.int64)


def resolve_device(device: str) -> torch.device:
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")
    return torch.device(device)


def load_causal_lm(model_dir: str | Path):
    """(tokenizer, model): transformers' Auto classes, fp32 on the CPU, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model_dir {str(model_dir)!r} has no config.json")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except TypeError:  # transformers 4.x names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.config.use_cache = False
    return tokenizer, model.eval()


def find_decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(dotted name, module list) of the decoder layers: the ModuleList of num_hidden_layers."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def linear_modules(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


class _Captured(Exception):
    pass


@contextlib.contextmanager
def _layers_kept_off(model: torch.nn.Module, layers_name: str, device: torch.device):
    """Move everything but the decoder layers to `device` for the duration; then back to the CPU."""
    parent_name, _, attr = layers_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layers = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList())
    model.to(device)
    setattr(parent, attr, layers)
    try:
        yield
    finally:
        setattr(parent, attr, torch.nn.ModuleList())
        model.to("cpu")
        setattr(parent, attr, layers)


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerStream:
    """Inputs of the current decoder layer, one entry per calibration sample."""

    layers_name: str
    layers: torch.nn.ModuleList
    device: torch.device
    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)

    @classmethod
    @torch.no_grad()
    def capture(cls, model: torch.nn.Module, samples: torch.Tensor, device: torch.device) -> LayerStream:
        """Run the model up to its first decoder layer for each sample and keep that layer's inputs."""
        layers_name, layers = find_decoder_layers(model)
        stream = cls(layers_name, layers, device)

        def catch(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            stream.hidden.append(hidden)
            stream.kwargs.append(kwargs)
            raise _Captured

        handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with _layers_kept_off(model, layers_name, device):
                for row in samples:
                    with contextlib.suppress(_Captured):
                        model(input_ids=row[None].to(device), use_cache=False)
        finally:
            handle.remove()
        return stream

    @torch.no_grad()
    def run(self, layer: torch.nn.Module, keep: bool = False) -> list[torch.Tensor] | None:
        """Run every sample through `layer` (hooks fire); the outputs when `keep`."""
        outs = []
        for hidden, kwargs in zip(self.hidden, self.kwargs):
            out = _first_output(layer(hidden, **kwargs))
            if keep:
                outs.append(out)
        return outs if keep else None

    def advance(self, layer: torch.nn.Module) -> None:
        """Replace the stored inputs by `layer`'s outputs (the next layer's inputs)."""
        self.hidden = self.run(layer, keep=True)


@contextlib.contextmanager
def input_hooks(modules: dict[str, torch.nn.Module], on_input: Callable[[str, torch.Tensor], None]):
    """Call on_input(name, x) with each module's input, flattened to [tokens, in_features]."""
    handles = [
        m.register_forward_hook(lambda mod, args, out, _n=name: on_input(_n, args[0].reshape(-1, args[0].shape[-1])))
        for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def input_groups(layer: torch.nn.Module, stream: LayerStream) -> list[list[str]]:
    """The layer's linears grouped by shared input tensor, in call order (q/k/v, o, gate/up, down).

    Found by running the first sample with hooks; tensors are kept alive during
    the run so no two inputs can share an identity.
    """
    seen: list[tuple[torch.Tensor, str]] = []
    linears = linear_modules(layer)
    handles = [
        m.register_forward_hook(lambda mod, args, out, _n=name: seen.append((args[0], _n)))
        for name, m in linears.items()
    ]
    try:
        _first_output(layer(stream.hidden[0], **stream.kwargs[0]))
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    placed: set[str] = set()
    for tensor, name in seen:
        if name not in placed:
            groups.setdefault(id(tensor), []).append(name)
            placed.add(name)
    return list(groups.values())


@torch.no_grad()
def perplexity(model: torch.nn.Module, samples: torch.Tensor, device: torch.device) -> float:
    """exp(mean next-token NLL) over the samples, computed one decoder layer at a time."""
    stream = LayerStream.capture(model, samples, device)
    for layer in stream.layers:
        layer.to(device)
        stream.advance(layer)
        layer.to("cpu")
    parent_name, _, _ = stream.layers_name.rpartition(".")
    base = model.get_submodule(parent_name) if parent_name else model
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    with _layers_kept_off(model, stream.layers_name, device):
        for hidden, row in zip(stream.hidden, samples):
            logits = head(base.norm(hidden)).float()[0, :-1]
            target = row[1:].to(device)
            total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += target.numel()
    return math.exp(total / count)


@dataclass
class QuantizationResult:
    """What `quantize_model_dir` made: the model (dequantized weights in place) and its codes."""

    model: torch.nn.Module
    weights: dict[str, object]  # linear prefix -> packing.QuantizedWeight
    layer_errors: list[float]  # per decoder layer: mean relative output error of its linears
    ppl_before: float | None
    ppl_after: float | None
    seconds: float


def quantize_model_dir(
    model_dir: str | Path,
    quantize_layer: Callable[[torch.nn.Module, LayerStream], tuple[dict, list[float]]],
    *,
    calibration: str | Path | None = None,
    num_samples: int = 128,
    seq_len: int = 512,
    device: str = "cpu",
    ppl_samples: int = 16,
) -> QuantizationResult:
    """Load `model_dir`, quantize decoder layer by decoder layer, measure perplexity before/after.

    Args:
        quantize_layer: (layer on device, stream) -> ({linear name in layer:
            QuantizedWeight}, [relative output error per linear]); it must leave
            the dequantized weights in the layer's linears.
        ppl_samples: calibration windows used for perplexity (0: skip it).
    """
    start = time.perf_counter()
    dev = resolve_device(device)
    tokenizer, model = load_causal_lm(model_dir)
    samples = calibration_samples(tokenizer, read_calibration_text(calibration), num_samples, seq_len)
    ppl_rows = samples[: max(ppl_samples, 0)]
    ppl_before = perplexity(model, ppl_rows, dev) if len(ppl_rows) else None
    stream = LayerStream.capture(model, samples, dev)
    weights, layer_errors = {}, []
    for i, layer in enumerate(stream.layers):
        layer.to(dev)
        found, errors = quantize_layer(layer, stream)
        weights.update({f"{stream.layers_name}.{i}.{name}": qw for name, qw in found.items()})
        layer_errors.append(sum(errors) / max(len(errors), 1))
        stream.advance(layer)
        layer.to("cpu")
    del stream
    ppl_after = perplexity(model, ppl_rows, dev) if len(ppl_rows) else None
    return QuantizationResult(model, weights, layer_errors, ppl_before, ppl_after, time.perf_counter() - start)


def summary(method: str, result: QuantizationResult, out_dir: Path) -> dict:
    """The JSON-friendly report the CLI prints."""
    return {
        "method": method,
        "out_dir": str(out_dir),
        "layers_quantized": len(result.layer_errors),
        "linears_quantized": len(result.weights),
        "seconds": round(result.seconds, 3),
        "layer_relative_errors": [round(e, 6) for e in result.layer_errors],
        "ppl_before": result.ppl_before,
        "ppl_after": result.ppl_after,
    }
