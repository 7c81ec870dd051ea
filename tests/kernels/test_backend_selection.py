"""Which attention backend runs where: the built-in backends on fake devices.

The Triton backend asks ``_device_capability(device)`` for the GPU's compute
capability; the tests replace it, so a CPU machine plays an sm75, sm80 or
sm90 GPU. Backends are registered through a private pluggy manager holding
the built-in ``kernels`` plugin (and, in one test, a plugin that overrides
the choice), so installed plugins never leak in.
"""

from __future__ import annotations

import re

import pluggy
import pytest
import torch

import framework
import plugins.kernels
from framework import hookspecs
from framework.engine.backend_selection import select_attention_backend
from framework.model_config import HFConfig, ModelConfig
from framework.registry import Registries, Registry
from plugins.kernels import triton_paged

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


class Chooser:
    """A third-party plugin that picks the backend itself."""

    def __init__(self, choice):
        self.choice = choice

    @framework.hookimpl
    def choose_attention_backend(self, device, model_config, candidates):
        self.seen = list(candidates)
        return self.choice


def registries(*extra_plugins) -> Registries:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(plugins.kernels, name="kernels")
    for i, plugin in enumerate(extra_plugins):
        pm.register(plugin, name=f"extra{i}")
    backends = Registry("attention backend")
    pm.hook.register_attention_backends(register=lambda name, target: backends.add(name, target, "kernels"))
    return Registries(
        models=Registry("model"), attention_backends=backends, quantizers=Registry("quantizer"),
        samplers=Registry("sampler"), plugins=["kernels"], hook=pm.hook,
    )  # fmt: skip


def model_config(dtype=torch.bfloat16, head_dim=128, kv_cache_dtype="auto", block_size=16) -> ModelConfig:
    hf = HFConfig(num_hidden_layers=1, num_attention_heads=4, hidden_size=4 * head_dim, vocab_size=8)
    return ModelConfig(
        path=None, hf_config=hf, architecture="X", dtype=dtype,
        max_model_len=64, block_size=block_size, kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a GPU of the given capability is there (and Triton installed)."""

    def set_capability(capability):
        fake = lambda device: capability if device.type == "cuda" else None  # noqa: E731
        monkeypatch.setattr(triton_paged, "_device_capability", fake)
        monkeypatch.setattr(triton_paged, "_triton_available", lambda: True)

    return set_capability


def test_cpu_gets_the_torch_reference(gpu):
    gpu((9, 0))
    assert select_attention_backend(registries(), CPU, model_config(), None).name == "torch"


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0)], ids=["sm80", "sm89", "sm90"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_supported_gpu_gets_triton(gpu, capability, dtype):
    gpu(capability)
    backend = select_attention_backend(registries(), GPU, model_config(dtype=dtype), None)
    assert backend is triton_paged.TritonPagedAttention and backend.priority > 0


@pytest.mark.parametrize(
    "capability,config,reason",
    [
        ((7, 5), {}, "compute capability >= 8.0 (sm80); the device is sm75"),
        ((9, 0), {"head_dim": 512}, "head_dim 512 is not supported"),
        ((9, 0), {"head_dim": 72}, "head_dim 72 is not supported"),
        ((9, 0), {"block_size": 24}, "block_size 24 is not a power of two"),
    ],
)
def test_unsupported_gpu_falls_back_and_a_forced_choice_names_the_reason(gpu, capability, config, reason):
    gpu(capability)
    regs = registries()
    assert select_attention_backend(regs, GPU, model_config(**config), None).name == "torch"
    with pytest.raises(ValueError, match=f"'triton' cannot run on cuda:0: .*{re.escape(reason)}"):
        select_attention_backend(regs, GPU, model_config(**config), "triton")


def test_forcing_triton_on_cpu_names_the_reason(gpu):
    gpu((9, 0))
    reason = r"attention_backend 'triton' cannot run on cpu: needs a CUDA GPU \(device is cpu\)"
    with pytest.raises(ValueError, match=reason):
        select_attention_backend(registries(), CPU, model_config(), "triton")


def test_forcing_torch_on_a_gpu(gpu):
    gpu((9, 0))
    assert select_attention_backend(registries(), GPU, model_config(), "torch").name == "torch"


def test_without_triton_the_gpu_gets_torch(gpu, monkeypatch):
    gpu((9, 0))
    monkeypatch.setattr(triton_paged, "_triton_available", lambda: False)
    regs = registries()
    assert select_attention_backend(regs, GPU, model_config(), None).name == "torch"
    with pytest.raises(ValueError, match="triton is not installed"):
        select_attention_backend(regs, GPU, model_config(), "triton")


@pytest.mark.parametrize("choice,expected", [("torch", "torch"), (None, "triton")])
def test_a_plugin_overrides_the_choice(gpu, choice, expected):
    gpu((9, 0))
    chooser = Chooser(choice)
    assert select_attention_backend(registries(chooser), GPU, model_config(), None).name == expected
    assert chooser.seen == ["triton", "torch"]  # candidates, highest priority first


def test_supports_reasons(gpu):
    gpu((9, 0))
    ok = dict(device=GPU, dtype=torch.float16, head_dim=128, kv_cache_dtype=torch.float16, block_size=16)
    supports = triton_paged.TritonPagedAttention.supports
    assert supports(**ok) is None
    assert supports(**{**ok, "head_dim": 64}) is None and supports(**{**ok, "head_dim": 256}) is None
    assert supports(**{**ok, "block_size": 32}) is None
    assert supports(**{**ok, "kv_cache_dtype": torch.float8_e4m3fn}) is None
    assert supports(**{**ok, "kv_cache_dtype": torch.float8_e5m2}) is None
    assert "float8_e4m3fn" in supports(**{**ok, "kv_cache_dtype": torch.int8})
    assert "dtype torch.float64" in supports(**{**ok, "dtype": torch.float64})
    gpu((8, 0))  # e4m3 conversions need sm89; e5m2 runs on sm80
    assert "sm89" in supports(**{**ok, "kv_cache_dtype": torch.float8_e4m3fn})
    assert supports(**{**ok, "kv_cache_dtype": torch.float8_e5m2}) is None
    gpu(None)  # a CUDA device name on a machine without one
    assert supports(**ok) == "no CUDA device is available"


def test_capability_of_a_cpu_device_is_none():
    assert triton_paged._device_capability(CPU) is None
    if not torch.cuda.is_available():
        assert triton_paged._device_capability(GPU) is None
