"""The main loop of the int4 tensor-core kernel as sm_90 SASS, compiled here without a GPU (the ptxas and
nvdisasm that Triton ships), for tests that check what the compiler made of it.

Run as a script (a process of its own: the tests' Triton runs in interpreter mode, which cannot compile):

    python3 tests/quant/int4_sass.py '{"rows": 1, "kslices": 8, "unroll": 1, "num_warps": 4, "barrier": true}'

prints JSON: ``{"loop": [...], "copied": [...]}``, the kinds of the loop body's memory, barrier and mma
instructions in order (``W`` a 16-byte global load: weight words, or activations where they are coherent;
``x`` a 16-byte non-coherent load: activations; ``z`` an 8-byte global load: scale words; ``B`` a barrier;
``M`` an ``mma``) and of the loads whose registers the loop copies (``copied_loads``), or ``{"skip": why}``
where this Triton cannot compile for sm_90 here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SIGNATURE = {
    "x_ptr": "*bf16", "qw_ptr": "*i32", "sz_ptr": "*i32", "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
    "M": "i32", "N": "i32", "K": "i32", "sxm": "i32", "G": "i32", "sb_per_split": "i32", "num_splits": "i32",
    "row_words": "i32",
}  # fmt: skip
ALIGNED = ("x_ptr", "qw_ptr", "sz_ptr", "out_ptr", "ws_ptr", "cnt_ptr", "N", "K", "sxm", "row_words")


def sass(cfg: dict) -> str:
    """nvdisasm's listing of the kernel for the program ``cfg`` (mma_matmul's keywords; one split, M <= 8)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from plugins.quant import int4_mma

    asm, constraints = int4_mma._asm(True, 1)
    constexprs = {
        "GROUP": 128, "R": cfg["rows"], "U": cfg["unroll"], "SERIAL": False, "ASM": asm, "CONSTRAINTS": constraints,
        "DEPTH": cfg.get("depth", 1), "EVICT": "", "MB": 1, "PDL": False, "KS": cfg.get("kslices", 1), "DIRECT": True,
        "EMULATE": False, "MAGIC": 128, "PAIRED": False, "GATED": False, "XJIT": cfg.get("xjit", False),
        "BARRIER": cfg.get("barrier", False), "RING": cfg.get("ring", False),
        "INTERLEAVE": cfg.get("interleave", False), "EARLY": cfg.get("early", False),
    }  # fmt: skip
    names = list(SIGNATURE)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED}
    source = ASTSource(fn=int4_mma._mma_kernel, signature=SIGNATURE, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cfg["num_warps"], "num_stages": 1})  # fmt: skip
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout


def _mma_loop(listing: str) -> list[str]:
    """The lines of the loop that holds the mma (from its label to its backward branch)."""
    lines = listing.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^\.(L_x_\d+):", line.strip()))}
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\(\.(L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i and any("HMMA" in b for b in lines[labels[m.group(1)] : i + 1]):
            return lines[labels[m.group(1)] : i + 1]
    raise ValueError("no loop with an mma in the listing")


def _load(line: str) -> tuple[str, range] | None:
    """A global load's kind (see the module docstring) and the registers it fills, or None."""
    ld = re.search(r"LDG\.E\.(128|64)(\.CONSTANT)?\s+R(\d+),", line)
    if not ld:
        return None
    kind = "z" if ld.group(1) == "64" else "x" if ld.group(2) else "W"
    first = int(ld.group(3))
    return kind, range(first, first + (4 if ld.group(1) == "128" else 2))


def loop_body(listing: str) -> list[str]:
    """The instruction kinds (see the module docstring) of the loop that holds the mma, in order."""
    kinds = []
    for line in _mma_loop(listing):
        load = _load(line)
        if "HMMA" in line:
            kinds.append("M")
        elif re.search(r"\bBAR\.", line):
            kinds.append("B")
        elif load:
            kinds.append(load[0])
    return kinds


def copied_loads(listing: str) -> list[str]:
    """The kinds (as ``loop_body``'s) of the loads in the mma's loop whose registers a later move of the loop
    copies: such a copy waits for its load, so a load copied at the loop's end is waited for in the step."""
    loaded, copied = {}, []
    for line in _mma_loop(listing):
        load = _load(line)
        if load:
            loaded.update({r: load[0] for r in load[1]})
        mv = re.search(r"\bI?MAD\.MOV\.U32\s+R\d+,\s*RZ,\s*RZ,\s*R(\d+)\b|\bMOV\s+R\d+,\s*R(\d+)\b", line)
        if mv and int(mv.group(1) or mv.group(2)) in loaded:
            copied.append(loaded[int(mv.group(1) or mv.group(2))])
    return copied


def run(cfg: dict) -> dict:
    """``loop_body`` of ``cfg``'s program, compiled in a fresh process outside the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, json.dumps(cfg)], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401

        nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        if not nvdisasm.exists():
            print(json.dumps({"skip": f"no nvdisasm at {nvdisasm}"}))
            sys.exit(0)
    except ImportError as err:
        print(json.dumps({"skip": f"no Triton NVIDIA backend: {err}"}))
        sys.exit(0)
    listing = sass(json.loads(sys.argv[1]))
    print(json.dumps({"loop": loop_body(listing), "copied": copied_loads(listing)}))
