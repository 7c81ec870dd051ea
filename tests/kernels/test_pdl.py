"""Programmatic dependent launch (``framework.ops.pdl``, ``FRAMEWORK_PDL``: auto, 1 or 0).

On the CPU: when the kernels ask for it (by mode and the step's rows), and that every kernel taking part
waits for the one before it before it touches anything that one writes (its first statement, or, for the
int4 kernel, before the first load of x). On a GPU (sm_90+): a tiny model's greedy tokens and logprobs under PDL, CUDA graphs included,
equal those without.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from framework.ops import pdl, triton_activation, triton_gemv, triton_rmsnorm  # noqa: E402
from plugins.kernels import triton_cache_write, triton_decode  # noqa: E402
from plugins.quant import int4_mma  # noqa: E402

KERNELS = [
    triton_rmsnorm._rms_norm_kernel,
    triton_activation._silu_and_mul_kernel,
    triton_cache_write._rotary_write_kv_kernel,
    triton_decode._decode_split_kernel,
    triton_gemv._gemv_kernel,
]


def test_launch_args_only_when_enabled_on_sm90(monkeypatch):
    monkeypatch.setattr(pdl, "AVAILABLE", True)
    monkeypatch.setattr(pdl, "_capable", lambda index: index == 0)  # device 0 is sm_90, device 1 older
    on = {"PDL": True, "launch_pdl": True}
    monkeypatch.setattr(pdl, "MODE", "0")
    assert pdl.launch_args(torch.device("cuda", 0), 1) == {}
    monkeypatch.setattr(pdl, "MODE", "1")
    assert pdl.launch_args(torch.device("cpu"), 1) == {}
    assert pdl.launch_args(torch.device("cuda", 0)) == pdl.launch_args(torch.device("cuda", 0), 256) == on
    assert pdl.launch_args(torch.device("cuda", 1), 1) == {}
    monkeypatch.setattr(pdl, "MODE", "auto")  # the default: steps of up to AUTO_MAX_ROWS rows
    assert pdl.launch_args(torch.device("cuda", 0), 1) == pdl.launch_args(torch.device("cuda", 0), 8) == on
    assert pdl.launch_args(torch.device("cuda", 0), 9) == pdl.launch_args(torch.device("cuda", 0)) == {}
    assert pdl.launch_args(torch.device("cuda", 1), 1) == {}
    monkeypatch.setattr(pdl, "AVAILABLE", False)  # a Triton without the griddepcontrol helpers
    assert pdl.launch_args(torch.device("cuda", 0), 1) == {}


def test_mode_from_the_environment():
    """FRAMEWORK_PDL defaults to auto; a value other than 0, 1 or auto is an error naming the variable."""
    import os
    import subprocess
    import sys

    code = "from framework.ops import pdl; print(pdl.MODE)"
    env = {k: v for k, v in os.environ.items() if k != "FRAMEWORK_PDL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == "auto", out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "FRAMEWORK_PDL": "yes"}, timeout=120)  # fmt: skip
    assert out.returncode != 0 and "FRAMEWORK_PDL must be 0, 1 or auto; got 'yes'" in out.stderr


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.fn.__name__)
def test_every_kernel_waits_first(kernel):
    """The body's first statement is ``pdl_start(PDL)``, and PDL is a constexpr defaulting to off."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(kernel.fn)))
    fn = tree.body[0]
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    first = body[0]
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Call)
    assert first.value.func.id == "pdl_start" and first.value.args[0].id == "PDL"
    defaults = dict(zip([a.arg for a in fn.args.args][-len(fn.args.defaults) :], fn.args.defaults))
    assert isinstance(defaults["PDL"], ast.Constant) and defaults["PDL"].value is False


def test_int4_kernel_reads_x_only_after_the_wait():
    source = inspect.getsource(int4_mma._mma_kernel.fn)
    body = source[source.index("# fmt: on") :]
    assert body.index("gdc_launch_dependents()") < body.index("griddepcontrol.wait") < body.index("_load_step(")
    # only the read-only weights are loaded above the wait
    above = body[: body.index("griddepcontrol.wait")]
    assert "_load_step(" not in above and "tl.store" not in above and "atomic" not in above


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs an sm_90+ GPU"
)
def test_greedy_tokens_equal_with_and_without_pdl(tmp_path, monkeypatch):
    import framework
    from framework.testing import make_tiny_model

    path = make_tiny_model("LlamaForCausalLM", tmp_path / "m", num_key_value_heads=2)
    prompts = [[5, 9, 13], [7] * 20, list(range(11, 29))]
    params = framework.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)

    def run(enabled: bool):
        monkeypatch.setattr(pdl, "MODE", "1" if enabled else "0")
        llm = framework.LLM(str(path), dtype="bfloat16", max_model_len=128, device="cuda")
        assert llm.engine.runner.graphs is not None  # decode steps replay CUDA graphs (PDL edges inside)
        outs = llm.generate(prompts, params, use_tqdm=False)
        result = [(o.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids,
                                                                             o.outputs[0].logprobs)])
                  for o in outs]  # fmt: skip
        del llm
        torch.cuda.empty_cache()
        return result

    ref, got = run(False), run(True)
    for (ids, lps), (ref_ids, ref_lps) in zip(got, ref):
        assert ids == ref_ids
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) == 0.0  # the same kernels: the same bits
