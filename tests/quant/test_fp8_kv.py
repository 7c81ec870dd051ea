"""FP8 KV cache (``kv_cache_dtype="fp8"`` / ``"fp8_e4m3"`` / ``"fp8_e5m2"``) on the torch backend (CPU, fp32 models).

Oracles:

* exactness: transformers on the same checkpoint with its K (after rotary)
  and V fake-quantized exactly as the cache stores them
  (``dequantize(quantize(x, scale))``); the engine's logprobs match it to
  float noise, so the write, the scales and the dequantizing reads are right;
* closeness to an unquantized cache: plain transformers. On a model with
  realistic activations (``initializer_range=0.05``, ``logit_scale=2``) the
  measured worst |logprob difference| of the greedy tokens over 3 prompts x
  24 steps is 0.12 / 0.11 (e4m3, Llama / Qwen2) and 0.23 / 0.34 (e5m2); the
  bounds are 0.25 and 0.5. (The default tiny model, built for peaked attention and logits
  of std 8, amplifies the fp8 rounding to differences of several nats.)
* cache contents: the bytes at the step's ``slot_mapping`` equal
  ``quantize(k, k_scale)`` with the checkpoint's scales.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import framework
from framework.layers.attention import Attention
from framework.testing import make_tiny_model
from plugins.kernels.torch_paged import TorchPagedAttention
from plugins.quant import fp8_kv

PROMPTS = ["The quick brown fox jumps over the lazy dog, and then", "Hello", "1 2 3 4 5 6 7 8 9 10 11 12 13"]
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
CLOSE_BOUND = {"fp8": 0.25, "fp8_e5m2": 0.5}  # max |dlogprob| vs an unquantized cache (measured <= 0.12 / 0.34)
EXACT_BOUND = 1e-4  # vs the fake-quantized oracle: float32 noise (measured 2.6e-6)


@pytest.fixture(scope="module", params=["LlamaForCausalLM", "Qwen2ForCausalLM"])
def model_dir(request, tmp_path_factory):
    return make_tiny_model(
        request.param, tmp_path_factory.mktemp(request.param), initializer_range=0.05, logit_scale=2.0
    )


def build(model_dir, kv_cache_dtype, **extra):
    return framework.build(
        {"model": str(model_dir), "dtype": "float32", "max_model_len": 128, "kv_cache_dtype": kv_cache_dtype, **extra}
    )


def greedy(llm, prompts=PROMPTS, max_tokens=24):
    params = framework.SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    return llm.generate(prompts, params, use_tqdm=False)


@contextmanager
def fake_quantized_kv(hf, arch: str, dtype: torch.dtype, scales: dict[int, tuple[float, float]]):
    """transformers with K (after rotary) and V of layer i rounded through fp8 with ``scales[i]``."""
    import importlib

    family = arch.removesuffix("ForCausalLM").lower()  # llama, qwen2
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    original = module.apply_rotary_pos_emb  # looked up at call time by the attention forward
    current = {"layer": 0}

    def fq(x, scale):
        return fp8_kv.dequantize(fp8_kv.quantize(x, scale, dtype), scale, x.dtype)

    def rotary(q, k, *args, **kwargs):
        q, k = original(q, k, *args, **kwargs)
        return q, fq(k, scales.get(current["layer"], (1.0, 1.0))[0])

    hooks = []
    for i, layer in enumerate(hf.model.layers):
        attn = layer.self_attn
        hooks.append(attn.register_forward_pre_hook(lambda mod, args, i=i: current.__setitem__("layer", i)))
        hooks.append(attn.v_proj.register_forward_hook(
            lambda mod, args, out, i=i: fq(out, scales.get(i, (1.0, 1.0))[1])
        ))  # fmt: skip
    module.apply_rotary_pos_emb = rotary
    try:
        yield hf
    finally:
        module.apply_rotary_pos_emb = original
        for h in hooks:
            h.remove()


def max_logprob_error(outs, hf) -> float:
    """Worst |logprob| difference between each greedy token and ``hf`` on the engine's own tokens."""
    worst = 0.0
    for out in outs:
        completion = out.outputs[0]
        ids = out.prompt_token_ids + completion.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        start = len(out.prompt_token_ids) - 1
        for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            worst = max(worst, abs(entry[token].logprob - ref[start + i, token].item()))
    return worst


def architecture(model_dir) -> str:
    return json.loads((model_dir / "config.json").read_text())["architectures"][0]


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_logprobs_close_to_unquantized_and_exact_to_fake_quant(model_dir, kv_cache_dtype):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # chunks of 16 tokens: prefill reads cached context as well as fresh keys
    llm = build(model_dir, kv_cache_dtype, max_num_batched_tokens=16)
    assert llm.engine.runner.kv_cache.dtype == FP8[kv_cache_dtype]
    outs = greedy(llm)
    unquantized = max_logprob_error(outs, hf)
    assert unquantized < CLOSE_BOUND[kv_cache_dtype]
    with fake_quantized_kv(hf, architecture(model_dir), FP8[kv_cache_dtype], {}) as oracle:
        exact = max_logprob_error(outs, oracle)
    assert exact < EXACT_BOUND, f"fp8 cache vs fake-quantized oracle: {exact:.2e} (vs unquantized {unquantized:.3f})"
    assert unquantized > 10 * exact  # the oracle sees the rounding that the cache really does


def write_scales(model_dir, tmp_path, tensors: dict[str, torch.Tensor]):
    """A copy of the checkpoint with extra (scale) tensors."""
    import shutil

    target = tmp_path / "scaled"
    shutil.copytree(model_dir, target)
    (weights,) = target.glob("*.safetensors")
    state = load_file(weights)
    state.update(tensors)
    save_file(state, weights, metadata={"format": "pt"})
    return target


def test_checkpoint_scales_are_applied(model_dir, tmp_path):
    """Current (k_scale/v_scale) and older (k_proj.output_scale / kv_scale) names; cache bytes = quantize(x, scale)."""
    scales = {0: (0.03, 0.02), 1: (0.05, 0.05)}
    tensors = {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.03),
        "model.layers.0.self_attn.v_proj.output_scale": torch.tensor([0.02]),
        "model.layers.1.self_attn.kv_scale": torch.tensor(0.05),
        "model.layers.1.self_attn.q_scale": torch.tensor(0.7),  # attention-quant scale: ignored
    }
    scaled = write_scales(model_dir, tmp_path, tensors)
    llm = build(scaled, "fp8", enforce_eager=True)  # a CUDA-graph replay would bypass the wrapped forward
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
    assert [(round(a.k_scale.item(), 6), round(a.v_scale.item(), 6)) for a in layers] == [scales[0], scales[1]]

    checked = []

    def checking(layer, forward):
        def wrapped(q, k, v, kv_cache, metadata, **kwargs):
            out = forward(q, k, v, kv_cache, metadata, **kwargs)
            flat = kv_cache.view(torch.uint8).view(2, -1, layer.num_kv_heads, layer.head_dim)
            n = metadata.num_tokens
            for j, (x, scale) in enumerate(((k, layer.k_scale), (v, layer.v_scale))):
                want = fp8_kv.quantize(x[:n], scale, torch.float8_e4m3fn).view(torch.uint8)
                assert torch.equal(flat[j, metadata.slot_mapping], want)
            checked.append(n)
            return out

        return wrapped

    for layer in layers:
        layer.impl.forward = checking(layer, layer.impl.forward)
    outs = greedy(llm, PROMPTS[:2], max_tokens=4)
    assert len(checked) >= 2 * 4 and max(checked) > 1  # prefill and decode steps, both layers
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with fake_quantized_kv(hf, architecture(model_dir), torch.float8_e4m3fn, scales) as oracle:
        assert max_logprob_error(outs, oracle) < EXACT_BOUND


def test_bad_checkpoint_scale_is_named(model_dir, tmp_path):
    scaled = write_scales(model_dir, tmp_path, {"model.layers.0.self_attn.k_scale": torch.ones(2)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_scale.*one value per layer"):
        build(scaled, "fp8")


def test_calculated_scales_from_first_prefill(model_dir):
    llm = build(model_dir, "fp8_e4m3", calculate_kv_scales=True)
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
    seen = {}
    for i, layer in enumerate(layers):
        forward = layer.impl.forward

        def wrapped(q, k, v, *args, i=i, forward=forward, **kwargs):
            seen.setdefault(i, (k.abs().amax().item(), v.abs().amax().item()))  # the first step's K/V
            return forward(q, k, v, *args, **kwargs)

        layer.impl.forward = wrapped
    greedy(llm, PROMPTS[:1], max_tokens=3)
    for i, layer in enumerate(layers):
        assert layer.k_scale.item() == pytest.approx(seen[i][0] / 448, rel=1e-6)
        assert layer.v_scale.item() == pytest.approx(seen[i][1] / 448, rel=1e-6)
        assert not layer.calculate_kv_scales  # once


def test_block_count_doubles(model_dir):
    budget = 1 << 20
    counts = {kv: build(model_dir, kv, kv_cache_memory=budget).engine.num_blocks for kv in ("float16", "fp8", "auto")}
    assert counts["fp8"] == 2 * counts["float16"] == 4 * counts["auto"]  # auto = float32 here
    # 2 layers x (K, V) x 16 tokens x 2 heads x 16 dims x 1 byte
    assert counts["fp8"] == budget // (2 * 2 * 16 * 2 * 16)


def test_invalid_kv_cache_dtype_names_field_and_choices():
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2.*'int8'"):
        framework.EngineConfig(kv_cache_dtype="int8")


def test_backends_accept_fp8_and_name_what_they_cannot_do(monkeypatch):
    from plugins.kernels import triton_paged

    cpu = torch.device("cpu")
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        assert TorchPagedAttention.supports(
            device=cpu, dtype=torch.float16, head_dim=128, kv_cache_dtype=dtype, block_size=16
        ) is None
    reason = TorchPagedAttention.supports(device=cpu, dtype=torch.float16, head_dim=128,
                                          kv_cache_dtype=torch.int8, block_size=16)  # fmt: skip
    assert "torch.int8" in reason and "float8_e5m2" in reason
    monkeypatch.setattr(triton_paged, "_triton_available", lambda: True)
    monkeypatch.setattr(triton_paged, "_device_capability", lambda device: (8, 0))
    gpu = dict(device=torch.device("cuda", 0), dtype=torch.bfloat16, head_dim=128, block_size=16)
    reason = triton_paged.TritonPagedAttention.supports(kv_cache_dtype=torch.float8_e4m3fn, **gpu)
    assert "sm89" in reason and "sm80" in reason and "fp8_e5m2" in reason
    assert triton_paged.TritonPagedAttention.supports(kv_cache_dtype=torch.float8_e5m2, **gpu) is None
    with pytest.raises(ValueError, match="cannot run on cpu: needs a CUDA GPU"):
        build_config = {"kv_cache_dtype": "fp8", "attention_backend": "triton", "device": "cpu"}
        framework.build(build_config)


def test_scale_name_rules():
    assert fp8_kv.kv_scale_targets("model.layers.3.self_attn.k_scale") == ("model.layers.3.self_attn", ("k",))
    assert fp8_kv.kv_scale_targets("model.layers.3.self_attn.kv_scale") == ("model.layers.3.self_attn", ("k", "v"))
    assert fp8_kv.kv_scale_targets("model.layers.3.self_attn.v_proj.output_scale") == (
        "model.layers.3.self_attn", ("v",))  # fmt: skip
    assert fp8_kv.kv_scale_targets("model.layers.3.self_attn.k_proj.k_scale") == ("model.layers.3.self_attn", ("k",))
    assert fp8_kv.kv_scale_targets("model.layers.3.self_attn.attn.v_scale") == ("model.layers.3.self_attn", ("v",))
    assert fp8_kv.kv_scale_targets("model.layers.3.self_attn.k_proj.weight") is None
    x = torch.tensor([1000.0, -1e6, 0.3, 1.9868])
    assert fp8_kv.quantize(x, 1.0, torch.float8_e4m3fn).float().tolist() == [448.0, -448.0, 0.3125, 2.0]
    assert fp8_kv.quantize(x, 2.0, torch.float8_e5m2).float().tolist() == [512.0, -57344.0, 0.15625, 1.0]
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8' is not an fp8 dtype"):
        fp8_kv.fp8_dtype("int8")
