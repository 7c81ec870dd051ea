"""The offline API: prompts of every shape, per-prompt params, seeds, chat, config sources."""

import dataclasses
import json

import pytest
import yaml

import framework
from framework.testing import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return framework.build({"model": str(model_dir), "max_model_len": 256})


def test_text_and_token_prompts_give_the_same_result(llm):
    params = framework.SamplingParams(temperature=0, max_tokens=8)
    by_text = llm.generate("Hello there", params, use_tqdm=False)[0]
    by_ids = llm.generate(by_text.prompt_token_ids, params, use_tqdm=False)[0]
    assert by_ids.prompt is None and by_ids.prompt_token_ids == by_text.prompt_token_ids
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids


def test_per_prompt_params_and_input_order(llm):
    prompts = ["a b c", "d e f g h i j", "k"]
    params = [framework.SamplingParams(temperature=0, max_tokens=n) for n in (3, 5, 7)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5, 7]
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(prompts, params[:2], use_tqdm=False)


def test_seed_gives_the_same_output_alone_and_in_a_batch_of_32(llm):
    """Seeded requests (n=1 and n=3) among 30 others of every kind: penalties, bias, min_tokens, n, beams."""
    seeded = framework.SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    seeded_n = framework.SamplingParams(n=3, temperature=1.0, top_k=50, seed=99, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["Once upon a time"], seeded, use_tqdm=False)[0].outputs[0].token_ids
    alone_n = [c.token_ids for c in llm.generate(["A tale"], seeded_n, use_tqdm=False)[0].outputs]
    others = [
        framework.SamplingParams(
            n=1 + i % 3, temperature=0.5 + i / 32, top_k=5 + i, max_tokens=8 + i % 8, presence_penalty=0.5 * (i % 2),
            repetition_penalty=1.0 + 0.1 * (i % 3), logit_bias={7: 2.0} if i % 4 == 0 else None, min_tokens=i % 5,
        )
        for i in range(28)
    ]  # fmt: skip
    others += [framework.SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=8)] * 2
    prompts = [f"prompt number {i} " * (1 + i % 4) for i in range(30)]
    batch = llm.generate(
        prompts[:13] + ["Once upon a time"] + prompts[13:20] + ["A tale"] + prompts[20:],
        others[:13] + [seeded] + others[13:20] + [seeded_n] + others[20:],
        use_tqdm=False,
    )
    assert batch[13].outputs[0].token_ids == alone
    assert [c.token_ids for c in batch[21].outputs] == alone_n and len({tuple(t) for t in alone_n}) == 3
    other_seed = framework.SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=16)
    assert llm.generate(["Once upon a time"], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_outputs_and_beam_search_through_generate(llm):
    out = llm.generate(["Hello"], framework.SamplingParams(n=4, temperature=0.9, max_tokens=5), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3] and all(len(c.token_ids) <= 5 for c in out.outputs)
    beams = framework.SamplingParams(n=2, best_of=4, use_beam_search=True, temperature=0, max_tokens=6)
    out = llm.generate(["Hello", "Bye"], beams, use_tqdm=False)
    for request in out:
        assert [c.index for c in request.outputs] == [0, 1] and request.finished
        first, second = request.outputs
        assert first.cumulative_logprob / len(first.token_ids) >= second.cumulative_logprob / len(second.token_ids)
        tok = llm.get_tokenizer()
        assert first.text == tok.decode(first.token_ids, skip_special_tokens=True)
    # a stop string cuts the returned text (it does not steer the search)
    best = out[0].outputs[0]
    stop = best.text[2:5]
    cut = llm.generate(["Hello"], framework.SamplingParams(**{**vars_of(beams), "stop": stop}), use_tqdm=False)[0]
    assert cut.outputs[0].token_ids == best.token_ids
    assert cut.outputs[0].text == best.text[: best.text.index(stop)] and cut.outputs[0].stop_reason == stop


def vars_of(params):
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}


def test_chat_uses_the_chat_template(llm):
    params = framework.SamplingParams(temperature=0, max_tokens=6)
    out = llm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], params, use_tqdm=False)[0]
    assert "<|user|>" in out.prompt and out.prompt.rstrip().endswith("<|assistant|>")
    tok = llm.get_tokenizer()
    assert out.prompt_token_ids == tok.encode(out.prompt, add_special_tokens=False)
    assert out.prompt_token_ids.count(tok.bos_token_id) <= 1  # BOS is not doubled
    custom = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    out2 = llm.chat([{"role": "user", "content": "hi"}], params, use_tqdm=False, chat_template=custom)[0]
    assert out2.prompt == "[hi]"


def test_config_from_yaml_json_dict_and_model(model_dir, tmp_path):
    settings = {"model": str(model_dir), "max_model_len": 64, "block_size": 8, "max_num_seqs": 4}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(settings))
    (tmp_path / "e.json").write_text(json.dumps(settings))
    for source in (tmp_path / "e.yaml", str(tmp_path / "e.json"), settings, framework.EngineConfig(**settings)):
        config = framework.config.load_config(source)
        assert (config.max_model_len, config.block_size, config.max_num_seqs) == (64, 8, 4)
    llm = framework.build(tmp_path / "e.yaml")
    assert llm.engine.model_config.max_model_len == 64 and llm.engine.kv.block_size == 8
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        framework.config.load_config(settings, block_size=12)
    with pytest.raises(ValueError, match=".yaml, .yml or .json"):
        (tmp_path / "e.toml").write_text("")
        framework.config.load_config(tmp_path / "e.toml")


def test_dummy_weights_load_the_model_shape(model_dir):
    llm = framework.build({"model": str(model_dir), "load_format": "dummy", "max_model_len": 64})
    out = llm.generate(["x"], framework.SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
    weight = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj.weight
    assert weight.abs().max() <= 1e-3 and weight.std() > 0
