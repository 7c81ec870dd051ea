"""`framework quantize`: GPTQ and AWQ algorithms, their checkpoints, and the CLI end to end.

Oracles: a round-to-nearest quantizer and unpackers written here from the
public format descriptions (AutoGPTQ v1: codes packed along input features,
zeros stored minus one; AWQ GEMM: packed along output features in the order
0, 2, 4, 6, 1, 3, 5, 7), and transformers for perplexity and logits.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from framework.testing import make_tiny_model
from plugins.quant import quantize_awq, quantize_gptq
from plugins.quant.calibration import DEFAULT_TEXT, calibration_samples

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
CALIB = dict(num_samples=8, seq_len=64)


# -- oracles written from the public descriptions --------------------------------


def rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """GPTQ's grid without error feedback: per row and group, fp16 scales, zero >= 1 when asymmetric."""
    maxq = 2**bits - 1
    out = torch.empty_like(w)
    for g0 in range(0, w.shape[1], group_size):
        block = w[:, g0 : g0 + group_size]
        lo, hi = block.min(1).values.clamp(max=0), block.max(1).values.clamp(min=0)
        if sym:
            hi = torch.maximum(hi, -lo)
            lo = -hi
        scale = ((hi - lo) / maxq).half().float()
        if sym:
            zero = torch.full_like(scale, (maxq + 1) // 2)
        else:
            zero = torch.round(-lo / scale)
            scale = torch.where(zero < 1, (hi / (maxq - 1)).half().float(), scale)
            zero = zero.clamp(1, maxq)
        q = torch.clamp(torch.round(block / scale[:, None]) + zero[:, None], 0, maxq)
        out[:, g0 : g0 + group_size] = scale[:, None] * (q - zero[:, None])
    return out


def unpack_slots(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., W] -> [..., W, 32 // bits]: slot j is bits [j*bits, (j+1)*bits), lowest first."""
    mask = 2**bits - 1
    return torch.stack([(words >> (bits * j)) & mask for j in range(32 // bits)], dim=-1).long()


def gptq_unpack(t: dict, prefix: str, bits: int) -> torch.Tensor:
    qweight, qzeros = t[f"{prefix}.qweight"], t[f"{prefix}.qzeros"]
    scales, g_idx = t[f"{prefix}.scales"].float(), t[f"{prefix}.g_idx"].long()
    codes = unpack_slots(qweight.t(), bits).reshape(qweight.shape[1], -1)  # [N, K]: row r slot j = input r*p+j
    zeros = unpack_slots(qzeros, bits).reshape(qzeros.shape[0], -1) + 1  # v1: stored zero - 1
    return scales[g_idx].t() * (codes - zeros[g_idx].t())


def awq_unpack(t: dict, prefix: str, group_size: int) -> torch.Tensor:
    def unpack(words):
        slots = unpack_slots(words, 4)  # [R, C, 8]: slot i holds column c*8 + AWQ_ORDER[i]
        out = torch.empty_like(slots)
        out[..., AWQ_ORDER] = slots
        return out.reshape(words.shape[0], -1)

    codes, zeros = unpack(t[f"{prefix}.qweight"]), unpack(t[f"{prefix}.qzeros"])  # [K, N], [G, N]
    g = torch.arange(codes.shape[0]) // group_size
    return (t[f"{prefix}.scales"].float()[g] * (codes - zeros[g])).t()


def dequantized_reference(src: Path, out: Path, method: str, bits: int, group_size: int):
    """transformers' model of `src`, with every tensor of the checkpoint in `out` (quantized ones unpacked)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tensors = load_file(out / "model.safetensors")
    state = {}
    for name, value in tensors.items():
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            w = gptq_unpack(tensors, prefix, bits) if method == "gptq" else awq_unpack(tensors, prefix, group_size)
            state[f"{prefix}.weight"] = w
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            state[name] = value.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


@torch.no_grad()
def hf_perplexity(model, rows: torch.Tensor) -> float:
    nll = [model(row[None], labels=row[None]).loss.item() for row in rows]
    return math.exp(sum(nll) / len(nll))


# -- a tiny model that has learned the text, so perplexity means something ------------


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """Tiny Llama (hidden 128, no GQA) trained for a few seconds on the built-in calibration text."""
    path = make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("trained"), hidden_size=128,
                           intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, logit_scale=2.0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tokenizer(DEFAULT_TEXT.read_text(), add_special_tokens=False)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(100):  # random 64-token crops, 4 a step: about 3 s on one core
        starts = torch.randint(0, len(ids) - 64, (4,), generator=gen).tolist()
        batch = torch.stack([ids[s : s + 64] for s in starts])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def eval_rows(trained_dir):
    tokenizer = AutoTokenizer.from_pretrained(trained_dir)
    return calibration_samples(tokenizer, DEFAULT_TEXT.read_text(), 8, 64)


# -- (1) GPTQ error compensation ------------------------------------------------------


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Strongly correlated features of uneven scale (a low-rank signal plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=gen)
    x = z @ torch.randn(8, k, generator=gen) + 0.1 * torch.randn(n, k, generator=gen)
    return x * torch.rand(k, generator=gen).add(0.2)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, -1), (8, 64)])
def test_gptq_beats_round_to_nearest(sym, desc_act, bits, group_size):
    k = 256  # two sweep blocks of 128 columns: the error also flows across blocks
    x = correlated_inputs(2048, k, seed=1)
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(2))
    hessian = 2 * x.t() @ x / x.shape[0]
    qw = quantize_gptq.gptq_quantize(w, hessian, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
    gs = k if group_size == -1 else group_size
    err_gptq = (x @ (qw.dequantize() - w).t()).norm()
    err_rtn = (x @ (rtn(w, bits, gs, sym) - w).t()).norm()
    # measured: x0.15 of RTN's error in order, x0.05 with act-order (x0.5 when blocks do not pass errors on)
    assert err_gptq < (0.1 if desc_act else 0.25) * err_rtn, (float(err_gptq), float(err_rtn))
    expected_g_idx = torch.arange(k) // gs
    if desc_act:  # g_idx follows the sweep order of decreasing diag(H): a permutation of the plain groups
        order = torch.argsort(torch.diag(hessian), descending=True, stable=True)
        assert torch.equal(qw.g_idx[order], expected_g_idx)
    else:
        assert torch.equal(qw.g_idx, expected_g_idx)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_without_correlation_is_round_to_nearest(sym):
    """With H = I no error is propagated, so GPTQ must equal the grid written above exactly."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    w[0, :32] = w[0, :32].abs()  # an all-positive group: the asymmetric zero would be 0 without the v1 guard
    qw = quantize_gptq.gptq_quantize(w, torch.eye(64), bits=4, group_size=32, sym=sym)
    assert torch.equal(qw.dequantize(), rtn(w, 4, 32, sym))
    assert int(qw.zeros.min()) >= 1 and torch.equal(qw.scales, qw.scales.half().float())


def test_gptq_dead_columns_are_zeroed():
    x = correlated_inputs(512, 64, seed=4)
    x[:, 5] = 0
    qw = quantize_gptq.gptq_quantize(torch.randn(16, 64), 2 * x.t() @ x / 512, group_size=32)
    assert torch.all(qw.dequantize()[:, 5] == 0)


# -- (2) AWQ scaling ---------------------------------------------------------------


def test_awq_scaling_beats_round_to_nearest_on_outlier_channels():
    gen = torch.Generator().manual_seed(5)
    k, n = 128, 64
    loud = torch.ones(k)
    loud[torch.randperm(k, generator=gen)[:4]] = 30.0

    def inputs(rows):
        return torch.randn(rows, k, generator=gen) * loud

    x, held_out = inputs(1024), inputs(1024)
    w = torch.randn(n, k, generator=gen)
    s = quantize_awq.search_scale(x, x.abs().mean(0), [w], group_size=32)
    awq_w = quantize_awq.awq_quantize(w * s, 32).dequantize() / s
    rtn_w = quantize_awq.awq_quantize(w, 32).dequantize()
    err_awq = (held_out @ (awq_w - w).t()).norm()
    err_rtn = (held_out @ (rtn_w - w).t()).norm()
    assert err_awq < 0.6 * err_rtn, (float(err_awq), float(err_rtn))  # measured: x0.48
    assert s[loud > 1].min() > s[loud == 1].max()  # the loud channels got the large scales


def test_awq_grid_matches_its_definition():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    qw = quantize_awq.awq_quantize(w, 32)
    for g in range(2):
        block = w[:, 32 * g : 32 * (g + 1)]
        scale = ((block.max(1).values - block.min(1).values).clamp(min=1e-5) / 15).half().float()
        zero = (-torch.round(block.min(1).values / scale)).clamp(0, 15)
        q = torch.clamp(torch.round(block / scale[:, None]) + zero[:, None], 0, 15)
        assert torch.equal(qw.dequantize()[:, 32 * g : 32 * (g + 1)], (q - zero[:, None]) * scale[:, None])


def test_awq_fold_keeps_the_float_layer_exact(trained_dir):
    """Scaling + folding alone (no rounding) leaves a decoder layer's output unchanged."""
    model = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    x = torch.randn(1, 16, 128)
    rotary = model.model.rotary_emb(x, torch.arange(16)[None])
    with torch.no_grad():
        before = layer(x, position_embeddings=rotary, attention_mask=None)
        before = before[0] if isinstance(before, tuple) else before
        mods = dict(layer.named_modules())
        for prev, names in quantize_awq.SCALE_GROUPS:
            s = torch.rand(mods[names[0]].in_features) + 0.5
            quantize_awq._fold(mods[prev], s)
            for name in names:
                mods[name].weight.mul_(s)
        after = layer(x, position_embeddings=rotary, attention_mask=None)
        after = after[0] if isinstance(after, tuple) else after
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


# -- (3) checkpoints unpack to exactly what the algorithm produced ------------------------


@pytest.mark.parametrize(
    "method,options",
    [
        ("gptq", dict(bits=4, group_size=64, sym=True, desc_act=False)),
        ("gptq", dict(bits=4, group_size=32, sym=False, desc_act=True)),
        ("gptq", dict(bits=8, group_size=-1, sym=True, desc_act=False)),
        ("awq", dict(group_size=64)),
    ],
)
def test_checkpoint_unpacks_to_the_dequantized_weights(trained_dir, tmp_path, method, options):
    module = quantize_gptq if method == "gptq" else quantize_awq
    result = module.quantize(trained_dir, **options, **CALIB, ppl_samples=0)
    if method == "gptq":
        module.save(result, trained_dir, tmp_path, damp_percent=0.01, **options)
    else:
        module.save(result, trained_dir, tmp_path, **options)
    tensors = load_file(tmp_path / "model.safetensors")
    model_state = result.model.state_dict()
    assert len(result.weights) == 14  # 7 linears x 2 layers, lm_head untouched
    for prefix, qw in result.weights.items():
        if method == "gptq":
            unpacked = gptq_unpack(tensors, prefix, options["bits"])
        else:
            unpacked = awq_unpack(tensors, prefix, options["group_size"])
        assert torch.equal(unpacked, qw.dequantize()), prefix
        assert torch.equal(unpacked, model_state[f"{prefix}.weight"]), prefix
        assert f"{prefix}.weight" not in tensors
    original = load_file(trained_dir / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(tensors[name], original[name])
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(tensors[norm], model_state[norm])
    if method == "awq":
        assert not torch.equal(tensors[norm], original[norm])  # the AWQ scales were folded in
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    if method == "gptq":
        assert config == {**json.loads((tmp_path / "quantize_config.json").read_text())}
        assert {k: config[k] for k in options} == options
        assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq"
        assert config["true_sequential"] is True
    else:
        assert config == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / name).read_bytes() == (trained_dir / name).read_bytes()


# -- (4) perplexity before and after, with transformers ------------------------------------


@pytest.mark.parametrize("method,options,bound", [
    # measured on this model (16 windows): gptq g128 x1.09, gptq g32 act-order x1.04, awq g128 x1.15;
    # round-to-nearest on the same grids: x1.22 (g128), x1.12 (g32) (torch 2.13 CPU). With torch 2.11 the
    # same 100 training steps give a slightly different model, on which AWQ g128 measured x1.21 against
    # RTN's x1.14: AWQ's gain over plain rounding is not stable on a model this small (its smoothing helps
    # with a few loud activation channels, which test (2) asserts), so only its bound is checked here.
    ("gptq", dict(bits=4, group_size=128, sym=False, desc_act=False), 1.15),
    ("gptq", dict(bits=4, group_size=32, sym=False, desc_act=True), 1.10),
    ("awq", dict(group_size=128), 1.30),
])
def test_perplexity_is_bounded(trained_dir, eval_rows, tmp_path, method, options, bound):
    module = quantize_gptq if method == "gptq" else quantize_awq
    report = module.quantize_checkpoint(trained_dir, tmp_path, **options, num_samples=16, seq_len=64, ppl_samples=8)
    fp32 = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32).eval()
    quantized = dequantized_reference(trained_dir, tmp_path, method, options.get("bits", 4), options["group_size"])
    rounded = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32).eval()
    for linear in rounded.model.layers.modules():
        if isinstance(linear, torch.nn.Linear):
            linear.weight.data = rtn(linear.weight.data, 4, options["group_size"], sym=False)
    before, after = hf_perplexity(fp32, eval_rows), hf_perplexity(quantized, eval_rows)
    baseline = hf_perplexity(rounded, eval_rows)
    print(f"{method} {options}: perplexity {before:.3f} -> {after:.3f} (x{after / before:.3f}; RTN {baseline:.3f})")
    assert before < 20  # the model has learned the text; otherwise the bound says nothing
    assert after / before < bound
    if method == "gptq":
        assert after < baseline  # error compensation beats plain rounding on the same grid
    # the tool's own report (layer by layer, on the first 8 of its 16 windows) agrees with transformers
    tool_rows = calibration_samples(AutoTokenizer.from_pretrained(trained_dir), DEFAULT_TEXT.read_text(), 16, 64)[:8]
    assert report["ppl_before"] == pytest.approx(hf_perplexity(fp32, tool_rows), rel=1e-4)
    assert report["ppl_after"] == pytest.approx(hf_perplexity(quantized, tool_rows), rel=1e-4)
    assert report["layers_quantized"] == 2 and report["linears_quantized"] == 14
    assert all(0 < e < 0.3 for e in report["layer_relative_errors"])


# -- (5) the CLI end to end, loaded by the engine ---------------------------------------------

_HAS_LOADER = all(importlib.util.find_spec(f"plugins.quant.{m}") for m in ("gptq", "awq"))


@pytest.fixture
def quant_plugin(monkeypatch):
    """The built-in quant plugin registered (as its entry point would) and wired to the quantize tool."""
    import plugins.quant
    from framework.registry import load_registries, plugin_manager

    pm = plugin_manager()
    added = pm.get_plugin("quant") is None
    if added:
        pm.register(plugins.quant, name="quant")
    try:
        quantizers = load_registries().quantizers
        for name, module in (("gptq", quantize_gptq), ("awq", quantize_awq)):
            cls = quantizers.get(name)
            if "quantize_checkpoint" not in vars(cls):  # until the loader delegates itself
                monkeypatch.setattr(cls, "quantize_checkpoint",
                                    classmethod(lambda c, m, o, _f=module.quantize_checkpoint, **kw: _f(m, o, **kw)),
                                    raising=False)
        yield
    finally:
        if added:
            pm.unregister(name="quant")


@pytest.mark.skipif(not _HAS_LOADER, reason="the GPTQ/AWQ loaders (plugins.quant.gptq, .awq) are not in place yet")
@pytest.mark.parametrize("method,flags,bits,group_size", [
    ("gptq", ["--desc-act", "--no-sym", "--group-size", "32"], 4, 32),
    ("awq", ["--group-size", "64"], 4, 64),
])
def test_cli_then_engine_matches_dequantized_transformers(trained_dir, tmp_path, quant_plugin, capsys,
                                                          method, flags, bits, group_size):
    import framework
    from framework.entrypoints.cli import main

    out = tmp_path / "q"
    argv = ["quantize", str(trained_dir), str(out), "--method", method, *flags,
            "--num-samples", "4", "--seq-len", "32"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == method and report["layers_quantized"] == 2

    reference = dequantized_reference(trained_dir, out, method, bits, group_size)
    llm = framework.build({"model": str(out), "dtype": "float32", "device": "cpu", "max_model_len": 64})
    params = framework.SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    for result in llm.generate(["The harbour town woke slowly", "Rivers shape the land"], params, use_tqdm=False):
        ids = result.prompt_token_ids
        with torch.no_grad():
            ref = torch.log_softmax(reference(torch.tensor([ids])).logits[0], -1)
        got = torch.tensor([result.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))])
        expected = torch.tensor([float(ref[p - 1, ids[p]]) for p in range(1, len(ids))])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_cli_rejects_unknown_method(trained_dir, tmp_path, capsys):
    from framework.entrypoints.cli import main

    assert main(["quantize", str(trained_dir), str(tmp_path), "--method", "nope"]) == 2
    assert "--method 'nope'" in capsys.readouterr().err


# -- bad input names the field and its limit --------------------------------------------


@pytest.mark.parametrize("module,options,field", [
    (quantize_gptq, dict(bits=3), "bits"),
    (quantize_gptq, dict(group_size=0), "group_size"),
    (quantize_gptq, dict(group_size=48), "group_size"),  # does not divide 128
    (quantize_gptq, dict(damp_percent=0.0), "damp_percent"),
    (quantize_gptq, dict(num_samples=0), "num_samples"),
    (quantize_gptq, dict(seq_len=1), "seq_len"),
    (quantize_gptq, dict(device="tpu"), "device"),
    (quantize_awq, dict(bits=8), "bits"),
    (quantize_awq, dict(sym=True), "sym"),
    (quantize_awq, dict(desc_act=True), "desc_act"),
])
def test_bad_options_name_the_field(trained_dir, tmp_path, module, options, field):
    with pytest.raises(ValueError, match=field):
        module.quantize_checkpoint(trained_dir, tmp_path, **{"num_samples": 2, "seq_len": 16, **options})


def test_output_must_not_overwrite_the_source(trained_dir):
    with pytest.raises(ValueError, match="out_dir"):
        quantize_gptq.quantize_checkpoint(trained_dir, trained_dir, num_samples=2, seq_len=16, ppl_samples=0)
