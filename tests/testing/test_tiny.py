"""framework.testing: tiny HF-format models, the local tokenizer, the demo model."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from framework.testing import ARCHITECTURES, demo_model_path, make_tiny_model, make_tokenizer
from framework.testing import demo as demo_module
from framework.testing import tokenizer as tokenizer_module

PROMPTS = ["The quick brown fox", "What is the capital of France?"]
TEXTS = [
    "Hello, world!  Two spaces,\ttabs and\nnewlines.",
    " leading and trailing spaces ",
    "Ünïcödé: héllo wörld, 日本語のテキスト, emoji 🙂🚀, Ελληνικά.",
]


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def architecture(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(architecture, tmp_path_factory):
    return make_tiny_model(architecture, tmp_path_factory.mktemp(architecture))


def _state_dict(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_unknown_architecture_lists_supported(tmp_path):
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        make_tiny_model("GPT2LMHeadModel", tmp_path)


def test_directory_loads_with_transformers(architecture, model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [architecture]
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert type(model).__name__ == architecture
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert config["vocab_size"] == len(tokenizer) == 512
    reference = make_tokenizer()
    assert all(tokenizer.encode(text) == reference.encode(text) for text in TEXTS)
    assert config["eos_token_id"] == tokenizer.eos_token_id
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert generation["bos_token_id"] == tokenizer.bos_token_id


def test_weights_differ_from_default_init(model_dir):
    # Norm weights and biases are random so a loader that drops them fails.
    state = _state_dict(model_dir)
    norms = [v for k, v in state.items() if "norm" in k]
    assert norms and all(not torch.all(v == 1) for v in norms)
    assert all(v.abs().sum() > 0 for k, v in state.items() if k.endswith("bias"))


def test_sharded_checkpoint_equals_unsharded(architecture, model_dir, tmp_path):
    sharded = make_tiny_model(architecture, tmp_path, shard_size="50KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    reference, loaded = _state_dict(model_dir), _state_dict(sharded)
    assert reference.keys() == loaded.keys()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)


def test_seed_and_dtype(tmp_path):
    a = load_file(make_tiny_model("LlamaForCausalLM", tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(make_tiny_model("LlamaForCausalLM", tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(make_tiny_model("LlamaForCausalLM", tmp_path / "c", seed=2) / "model.safetensors")
    half = make_tiny_model("LlamaForCausalLM", tmp_path / "d", seed=1, dtype="bfloat16")
    d = load_file(half / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert all(d[k].dtype == torch.bfloat16 and torch.equal(a[k].bfloat16(), d[k]) for k in a)
    config = json.loads((half / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"  # v5 / v4 name


def test_config_overrides_win(tmp_path):
    path = make_tiny_model(
        "LlamaForCausalLM", tmp_path, tie_word_embeddings=True, num_key_value_heads=1,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 1
    rope = config.get("rope_parameters") or config.get("rope_scaling")  # v5 / v4 name
    assert rope["rope_type"] == "linear" and rope["factor"] == 2.0
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@torch.no_grad()
def test_greedy_margins_exceed_float_noise(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # fp32 checkpoint
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(
            ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )
        assert len(out.scores) == 32
        for step in out.scores:  # min_new_tokens masks eos with -inf
            top2 = step[0].topk(2).values
            assert top2[0] - top2[1] > 1e-4
            assert step[step.isfinite()].abs().max() < 50


def test_tokenizer_round_trips_text(tmp_path):
    make_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens_and_chat_template(tmp_path):
    make_tokenizer(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == tokenizer_module.CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    special = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    assert tokenizer.convert_tokens_to_ids(special) == list(range(6))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n"
        "<|assistant|>\nHello.</s>\n<|user|>\nBye</s>\n<|assistant|>\n"
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|user|>")) == 2  # markers stay whole
    assert not tokenizer.apply_chat_template(messages[:2], tokenize=False).endswith("<|assistant|>\n")


def test_tokenizer_is_trained_once_and_deterministic():
    make_tokenizer()
    trainings = tokenizer_module._trained_tokenizer_json.cache_info().misses
    first, second = make_tokenizer(), make_tokenizer()
    assert tokenizer_module._trained_tokenizer_json.cache_info().misses == trainings == 1
    assert first is not second  # callers may mutate theirs
    retrained = tokenizer_module._trained_tokenizer_json.__wrapped__()
    assert retrained == tokenizer_module._trained_tokenizer_json()


def test_demo_model_is_created_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEWORK_CACHE_DIR", str(tmp_path))
    path = demo_model_path()
    assert path == tmp_path / demo_module.DEMO_MODEL_NAME
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers) == (128, 4)

    def fail(*args, **kwargs):
        raise AssertionError("demo model rebuilt")

    monkeypatch.setattr(demo_module, "make_tiny_model", fail)
    assert demo_model_path() == path
