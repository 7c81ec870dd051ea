"""Plugin discovery: entry points, the allow-list, disabling, hooks, the CLI listing."""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import framework
from framework import hookspecs, registry
from framework.attention import AttentionBackend
from framework.engine.backend_selection import select_attention_backend
from framework.model_config import ModelConfig
from framework.testing import make_tiny_model

BUILTINS = {"models", "kernels", "samplers", "quant"}


@pytest.fixture
def plugins_env(monkeypatch):
    """Set FRAMEWORK_PLUGINS for one test and reload plugins before and after."""

    def set_allow(value):
        monkeypatch.setenv("FRAMEWORK_PLUGINS", value)
        registry.reset_plugin_manager()

    yield set_allow
    monkeypatch.setenv("FRAMEWORK_PLUGINS", "")
    registry.reset_plugin_manager()


def loaded_names():
    return {name for name, _ in registry.plugin_manager().list_name_plugin()}


def test_every_hookspec_is_documented():
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "framework_spec")]
    assert {f.__name__ for f in specs} == {
        "register_models",
        "register_attention_backends",
        "register_quantizers",
        "register_samplers",
        "choose_attention_backend",
    }
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert "Fires" in doc and ":param" in doc, f"{spec.__name__} lacks a pytest-style docstring"


def test_allow_list_empty_loads_builtins_only(plugins_env):
    plugins_env("")
    assert loaded_names() == BUILTINS
    assert all(registry.is_builtin(n) for n in BUILTINS)


def test_example_plugin_is_found_through_its_entry_point(plugins_env):
    plugins_env("example")
    assert loaded_names() == BUILTINS | {"example"}
    assert not registry.is_builtin("example")
    regs = registry.load_registries()
    assert regs.models.entries["ExampleForCausalLM"].plugin == "example"
    # lazy: registration did not import the model module
    assert "framework_example_plugin.model" not in sys.modules or regs.models.get("ExampleForCausalLM")


def test_engine_runs_the_third_party_architecture_unchanged(plugins_env, tmp_path):
    """The example architecture has Llama's math, so transformers' Llama is its oracle."""
    from transformers import AutoModelForCausalLM

    plugins_env("example")
    path = make_tiny_model("LlamaForCausalLM", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["ExampleForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))

    llm = framework.build({"model": str(path)})
    assert llm.engine.model_config.architecture == "ExampleForCausalLM"
    out = llm.generate(["Hello world"], framework.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]

    config["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([out.prompt_token_ids])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist()


def test_disabling_a_plugin_removes_what_it_registered(plugins_env, tmp_path):
    plugins_env("example")
    regs = registry.load_registries(disable=["example"])
    assert "ExampleForCausalLM" not in regs.models and "LlamaForCausalLM" in regs.models
    path = make_tiny_model("LlamaForCausalLM", tmp_path / "m")
    with pytest.raises(ValueError, match="installed architectures: ExampleForCausalLM$"):
        framework.build({"model": str(path), "plugins": {"disable": ["models"]}})


def test_essential_and_unknown_plugins_cannot_be_disabled(plugins_env):
    plugins_env("")
    with pytest.raises(ValueError, match="essential"):
        registry.load_registries(disable=["samplers"])
    with pytest.raises(ValueError, match="not loaded.*kernels"):
        registry.load_registries(disable=["no-such-plugin"])


def test_registering_a_name_twice_names_both_plugins():
    reg = registry.Registry("model")
    reg.add("X", "a:B", "one")
    with pytest.raises(ValueError, match="'one'.*'two'"):
        reg.add("X", "a:C", "two")
    with pytest.raises(KeyError, match="installed: X"):
        reg.get("Y")


class _NeverBackend(AttentionBackend):
    name = "never"
    priority = 100

    @classmethod
    def supports(cls, **kwargs):
        return "needs hardware this test does not have"


class _ChooserPlugin:
    """A plugin object that registers a backend and picks one through the firstresult hook."""

    def __init__(self, choice):
        self.choice = choice

    @framework.hookimpl
    def register_attention_backends(self, register):
        register("never", _NeverBackend)

    @framework.hookimpl
    def choose_attention_backend(self, device, model_config, candidates):
        return self.choice


def _model_config():
    cfg = framework.model_config.HFConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=8, vocab_size=4)
    return ModelConfig(
        path=None, hf_config=cfg, architecture="X", dtype=torch.float32,
        max_model_len=8, block_size=16, kv_cache_dtype="auto",
    )  # fmt: skip


@pytest.mark.parametrize("choice", [None, "torch"])
def test_attention_backend_selection_and_the_choose_hook(plugins_env, choice):
    plugins_env("")
    pm = registry.plugin_manager()
    plugin = _ChooserPlugin(choice)
    pm.register(plugin, name="chooser")
    try:
        regs = registry.load_registries()
        cpu = torch.device("cpu")
        # the unsupported high-priority backend is skipped; the hook (or the default) picks torch
        assert select_attention_backend(regs, cpu, _model_config(), None).name == "torch"
        with pytest.raises(ValueError, match="'never' cannot run on cpu: needs hardware"):
            select_attention_backend(regs, cpu, _model_config(), "never")
        with pytest.raises(ValueError, match="'flash' is not installed; installed: never, torch"):
            select_attention_backend(regs, cpu, _model_config(), "flash")
    finally:
        pm.unregister(plugin)


def test_cli_lists_builtin_and_third_party_plugins():
    env = dict(os.environ, FRAMEWORK_PLUGINS="example")
    text = subprocess.run(
        [sys.executable, "-m", "framework", "plugins"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "example (third-party, framework_example_plugin)" in text
    assert "model: ExampleForCausalLM -> framework_example_plugin.model:ExampleForCausalLM" in text
    assert "models (built-in, plugins.models)" in text and "sampler: standard" in text
    listing = json.loads(
        subprocess.run(
            [sys.executable, "-m", "framework", "plugins", "--json"], env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    by_name = {p["name"]: p for p in listing}
    assert by_name["kernels"]["attention_backends"] == {
        "torch": "plugins.kernels.torch_paged:TorchPagedAttention",
        "triton": "plugins.kernels.triton_paged:TritonPagedAttention",
    }
    assert by_name["example"]["builtin"] is False
