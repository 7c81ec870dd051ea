"""The int4 tensor-core kernel's program table and options (``plugins.quant.int4_mma_tuned``, the keywords
of ``int4_mma.mma_matmul``): the table by row band and its override from the environment, the load-time
self-check over every band, the fused gate's row limit, and what the barrier option makes of the compiled
main loop."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch import nn

from plugins.quant import int4_mma
from plugins.quant import int4_mma_layout as layout
from plugins.quant.int4_mma_tuned import KEYWORDS


def test_tuned_configs_from_the_environment(monkeypatch):
    monkeypatch.delenv("FRAMEWORK_INT4_MMA_TUNED", raising=False)
    assert int4_mma._tuned() == int4_mma.TUNED
    monkeypatch.setenv("FRAMEWORK_INT4_MMA_TUNED", '{"6144x4096": {"rows": 8, "unroll": 1, "num_warps": 8, "pdl": true}}')
    tuned = int4_mma._tuned()  # the keys given replace the table's; the others stay
    assert tuned[(6144, 4096)] == {"rows": 8, "unroll": 1, "num_warps": 8, "pdl": True}
    assert tuned == {**int4_mma.TUNED, (6144, 4096): tuned[(6144, 4096)]}
    assert int4_mma.TUNED[(6144, 4096)] != tuned[(6144, 4096)]
    bad_values = (("{nope", "not JSON"), ('["6144x4096"]', "JSON object"), ('{"6144x4096x8": {}}', "6144x4096x8"),
                  ('{"6144by4096": {}}', "6144by4096"), ('{"6144x4096": {"rowz": 2}}', "rowz"))  # fmt: skip
    for bad, field in bad_values:
        monkeypatch.setenv("FRAMEWORK_INT4_MMA_TUNED", bad)
        with pytest.raises(ValueError, match=f"FRAMEWORK_INT4_MMA_TUNED.*{field}"):
            int4_mma._tuned()
    # what an entry may give is what mma_matmul takes for a program
    operands = {"x", "qweight", "szp", "group_size", "paired", "gated"}
    assert set(inspect.signature(int4_mma.mma_matmul).parameters) - operands == KEYWORDS


def test_matmul_takes_the_config_of_the_row_band(monkeypatch):
    """1..8 rows take the (N, K) entry, 9..16 / 17..32 / 33..64 the (N, K, band) one, an unknown shape DEFAULT."""
    seen = []
    monkeypatch.setattr(int4_mma, "mma_matmul", lambda x, qw, szp, group, paired, gated, **kw: seen.append(kw))
    monkeypatch.delenv("FRAMEWORK_INT4_MMA_TUNED", raising=False)
    qw = torch.empty(6144 // 16, 1, dtype=torch.int32)
    for m, key in ((1, (6144, 4096)), (8, (6144, 4096)), (9, (6144, 4096, 16)), (32, (6144, 4096, 32))):
        int4_mma.matmul(torch.empty(m, 4096), qw, None, 128)
        assert seen[-1] == int4_mma.TUNED[key], m
    int4_mma.matmul(torch.empty(1, 512), qw, None, 128)  # (6144, 512): not in the table
    assert seen[-1] == int4_mma.DEFAULT
    assert len({json.dumps(c, sort_keys=True) for c in seen[:4]}) == 3  # the bands hold different programs


def test_matmul_launches_as_a_programmatic_dependent_by_the_steps_rows(monkeypatch):
    """matmul asks framework.ops.pdl with the step's rows (x's); the table's "pdl" keyword, where given, wins."""
    seen, asked = [], []
    monkeypatch.setattr(int4_mma, "mma_matmul", lambda x, qw, szp, group, paired, gated, **kw: seen.append(kw))
    monkeypatch.setattr(int4_mma.pdl_launch, "enabled", lambda device, rows=None: asked.append(rows) or rows <= 8)
    monkeypatch.delenv("FRAMEWORK_INT4_MMA_TUNED", raising=False)
    qw = torch.empty(6144 // 16, 1, dtype=torch.int32)
    for m in (1, 8, 9, 16):
        int4_mma.matmul(torch.empty(m, 4096), qw, None, 128)
    assert asked == [1, 8, 9, 16]
    assert [kw.get("pdl", False) for kw in seen] == [True, True, False, False]
    program = '{"6144x4096": {"rows": 1, "kslices": 8, "num_warps": 4, "pdl": false}}'
    monkeypatch.setenv("FRAMEWORK_INT4_MMA_TUNED", program)
    int4_mma.matmul(torch.empty(1, 4096), qw, None, 128)
    assert seen[-1]["pdl"] is False


def test_fused_gate_serves_steps_of_up_to_eight_rows(monkeypatch):
    """Steps of more rows give None (the caller runs the paired projection and SiluAndMul): the gated programs
    were slower from 16 rows on."""
    from plugins.quant import int4_common

    layer = nn.Module()
    layer.mma_paired = True
    seen = []
    monkeypatch.setattr(int4_common, "_apply_mma", lambda layer, x, gated: seen.append((x.shape[0], gated)) or x[:, :2])
    monkeypatch.setattr(int4_common, "_code_order", lambda layer, x: x.reshape(-1, x.shape[-1]))
    assert int4_common.apply_int_silu(layer, torch.zeros(2, 4, 16)).shape == (2, 4, 2)
    assert int4_common.apply_int_silu(layer, torch.zeros(int4_common.FUSED_SILU_MAX_M + 1, 16)) is None
    assert int4_common.apply_int_silu(layer, torch.zeros(3, 16), bias=torch.zeros(4)) is None
    assert int4_common.fuses_int_silu(layer, 8) and not int4_common.fuses_int_silu(layer, 9)
    layer.mma_paired = False
    assert int4_common.apply_int_silu(layer, torch.zeros(3, 16)) is None
    assert not int4_common.fuses_int_silu(layer, 1)
    assert seen == [(8, True)]


def test_self_check_runs_every_tuned_program_in_its_row_band(monkeypatch):
    """``usable`` (the load-time check) runs each program of the table with rows of the band it serves (the
    1-8, 9-16 and 17-32 row programs), and DEFAULT, before the layers use them."""
    seen = set()

    def record(x, qw, szp, group, **cfg):
        seen.add((int4_mma._band(x.shape[0]), json.dumps(cfg, sort_keys=True)))
        return layout.reference_matmul(x, qw, szp, group)

    monkeypatch.setattr(int4_mma, "mma_matmul", record)
    assert int4_mma.usable.__wrapped__(torch.device("cpu"), torch.float16)
    for key, cfg in int4_mma.TUNED.items():
        if key[2:] == () or key[2] <= int4_mma.LAYER_MAX_M:
            assert (key[2:], json.dumps(cfg, sort_keys=True)) in seen, key
    assert ((), json.dumps(int4_mma.DEFAULT, sort_keys=True)) in seen


@pytest.mark.parametrize("program", [
    {"rows": 1, "kslices": 8, "unroll": 1, "num_warps": 4},  # gate_up's at up to 8 rows: two tile rows a warp
    {"rows": 2, "kslices": 4, "unroll": 2, "num_warps": 4, "depth": 2},
])  # fmt: skip
def test_barrier_keeps_the_next_steps_loads_ahead_of_the_mma(program):
    """The kernel's sm_90 SASS, compiled here (no GPU needed): with ``barrier`` the next step's weight and
    scale loads open the loop body, before its barrier, and every mma of the step comes after it. (Without
    the barrier ptxas issues them after the step's mma, so the step waits out a DRAM round trip: the
    compiler's choice, not asserted.)"""
    import int4_sass  # tests/quant/conftest.py puts this directory on sys.path

    out = int4_sass.run({**program, "barrier": True})
    if "skip" in out:
        pytest.skip(out["skip"])
    loop = out["loop"]
    assert "B" in loop, loop
    before, after = loop[: loop.index("B")], loop[loop.index("B") :]
    per_thread = program["rows"] * program["kslices"] // program["num_warps"] * program["unroll"]
    assert "M" not in before and after.count("M") >= 4, loop
    assert before.count("W") >= per_thread and before.count("z") >= 1, loop


@pytest.mark.parametrize("key", [(28672, 4096), (4096, 4096)])
def test_ring_never_copies_the_registers_its_weight_and_scale_loads_fill(key):
    """The table's ring programs (gate_up's and o's at up to 8 rows), compiled for sm_90 here: no move in the
    main loop copies a register that a weight or scale load fills. (A copy waits for its load: the plain
    program holds the next step's loads in registers and copies them at the loop's end, so each step waits out
    a DRAM round trip.) Both register sets' weight loads are in the loop."""
    import int4_sass  # tests/quant/conftest.py puts this directory on sys.path

    program = int4_mma.TUNED[key]
    assert program.get("ring"), program
    out = int4_sass.run(program)
    if "skip" in out:
        pytest.skip(out["skip"])
    assert "W" not in out["copied"] and "z" not in out["copied"], out
    per_thread = program["rows"] * program["kslices"] // program["num_warps"] * program["unroll"]
    assert out["loop"].count("W") >= 2 * per_thread and out["loop"].count("M") >= 8 * per_thread, out
