"""A small PTX emulator for the inline asm of ``plugins/quant/int4_mma.py`` (tests only).

It runs the asm strings the kernel hands to ``tl.inline_asm_elementwise`` on the
32 lanes of one warp in lockstep, with ``$N`` operands numbered as Triton numbers
them (the outputs' registers first, then each input's, ``pack`` registers an
operand). Only what those strings use is implemented: ``mov``, ``shr.u32``,
``prmt.b32`` (default mode), ``lop3.b32``, ``fma.rn.{bf16,f16}x2``, ``setp.lt.s32``,
predicated ``ld.global.nc.v2.{b32,b64}`` from a byte-addressed memory, and
``mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32`` with the
fragment layout of the PTX ISA (A: a0,a1 row g / a2,a3 row g+8 ... in 32-bit
pairs, see ``_mma``). Anything else raises, so a new instruction in the kernel
needs a line here before the CPU tests pass. The emulated fragments agree with
the hardware: the same asm passed its checks against the torch reference on an
H200 (``benchmarks/check_int4_mma.py``, docs/benchmarks.md).
"""

from __future__ import annotations

import re
import struct

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF


class Memory:
    """Global memory: tensors placed at made-up, 256-byte aligned addresses."""

    def __init__(self) -> None:
        self.blocks: list[tuple[int, bytes]] = []
        self.next = 1 << 20

    def place(self, t: torch.Tensor) -> int:
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        base = self.next
        self.blocks.append((base, data))
        self.next = (base + len(data) + 255) // 256 * 256 + 4096
        return base

    def load(self, addr: int, nbytes: int) -> int:
        for base, data in self.blocks:
            if base <= addr and addr + nbytes <= base + len(data):
                return int.from_bytes(data[addr - base : addr - base + nbytes], "little")
        raise IndexError(f"load of {nbytes} bytes at {addr:#x} outside every tensor")


def _half_to_float(bits: int, kind: str) -> float:
    t = torch.tensor([bits & 0xFFFF], dtype=torch.int32).to(torch.int16)
    return float(t.view(torch.bfloat16 if kind == "bf16" else torch.float16).item())


def _float_to_half(value: float, kind: str) -> int:
    # exact value -> float32 (exact for the products the kernel forms) -> one rounding to the 16-bit type
    t = torch.tensor([value], dtype=torch.float32).to(torch.bfloat16 if kind == "bf16" else torch.float16)
    return int(t.view(torch.int16).item()) & 0xFFFF


def _f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def bits_to_f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & MASK32))[0]


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def _prmt(a: int, b: int, sel: int) -> int:
    src = (a & MASK32) | ((b & MASK32) << 32)
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = (src >> (8 * (s & 7))) & 0xFF
        if s & 8:  # sign replicate
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _split(text: str) -> list[str]:
    return [p.strip() for p in re.split(r",(?![^{]*})", text)]


class Warp:
    """32 lanes running one asm string; ``regs[lane][name]`` holds bit patterns."""

    def __init__(self, memory: Memory) -> None:
        self.mem = memory

    def run(self, asm: str, constraints: str, operands: list[list[int]]) -> list[list[int]]:
        """``operands[n][lane]``: the value of ``$n`` (outputs' entries are ignored); returns them after."""
        kinds = constraints.split(",")
        regs = [{f"${n}": operands[n][lane] for n in range(len(kinds))} for lane in range(32)]
        preds = [dict() for _ in range(32)]
        lines = [ln.strip() for ln in asm.replace("\n", ";").split(";")]
        for line in lines:
            if line in ("", "{", "}") or line.startswith(".reg"):
                continue
            self._step(line, regs, preds)
        return [[regs[lane][f"${n}"] for lane in range(32)] for n in range(len(kinds))]

    def _val(self, r: dict, tok: str) -> int:
        tok = tok.strip()
        if tok in r:
            return r[tok]
        if re.fullmatch(r"-?0x[0-9a-fA-F]+|-?\d+", tok):
            return int(tok, 0)
        if re.fullmatch(r"0f[0-9a-fA-F]{8}", tok):
            return int(tok[2:], 16)
        raise KeyError(tok)

    def _step(self, line: str, regs: list[dict], preds: list[dict]) -> None:
        guard = None
        m = re.match(r"@(!?)(\w+)\s+(.*)", line)
        if m:
            guard, line = (m.group(1) == "!", m.group(2)), m.group(3)
        op, _, rest = line.partition(" ")
        args = _split(rest)
        if op.startswith("mma.sync.aligned.m16n8k16.row.col.f32."):
            kind = op.split(".")[-2]
            self._mma(args, regs, kind)
            return
        for lane in range(32):
            r = regs[lane]
            if guard is not None and preds[lane][guard[1]] == guard[0]:
                continue
            if op in ("mov.b32", "mov.u32"):
                r[args[0]] = self._val(r, args[1]) & MASK32
            elif op == "mov.b64":
                if args[0].startswith("{"):  # split a 64-bit value into (low, high)
                    lo, hi = [a.strip() for a in args[0].strip("{}").split(",")]
                    v = self._val(r, args[1])
                    r[lo], r[hi] = v & MASK32, (v >> 32) & MASK32
                else:
                    r[args[0]] = self._val(r, args[1]) & MASK64
            elif op == "shr.u32":
                r[args[0]] = (self._val(r, args[1]) & MASK32) >> self._val(r, args[2])
            elif op == "prmt.b32":
                r[args[0]] = _prmt(self._val(r, args[1]), self._val(r, args[2]), self._val(r, args[3]))
            elif op == "lop3.b32":
                vals = [self._val(r, a) & MASK32 for a in args[1:4]]
                r[args[0]] = _lop3(*vals, self._val(r, args[4]))
            elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
                kind = "bf16" if "bf16" in op else "f16"
                a, b, c = (self._val(r, x) for x in args[1:4])
                out = 0
                for half in range(2):
                    fa, fb, fc = (_half_to_float(v >> (16 * half), kind) for v in (a, b, c))
                    out |= _float_to_half(fa * fb + fc, kind) << (16 * half)
                r[args[0]] = out
            elif op == "setp.lt.s32":
                v = self._val(r, args[1]) & MASK32
                v = v - (1 << 32) if v & 0x80000000 else v
                preds[lane][args[0]] = v < self._val(r, args[2])
            elif op in ("ld.global.nc.v2.b64", "ld.global.nc.v2.b32", "ld.global.v2.b64", "ld.global.v2.b32"):
                width = 8 if op.endswith("b64") else 4
                dst = [a.strip() for a in args[0].strip("{}").split(",")]
                m2 = re.fullmatch(r"\[(\$\d+|\w+)(?:\+(\d+))?\]", args[1])
                addr = self._val(r, m2.group(1)) + int(m2.group(2) or 0)
                if addr % (2 * width):
                    raise ValueError(f"misaligned {op} at {addr:#x}")
                for i, d in enumerate(dst):
                    r[d] = self.mem.load(addr + i * width, width)
            else:
                raise NotImplementedError(op)

    def _mma(self, args: list[str], regs: list[dict], kind: str) -> None:
        """D = A B + C for m16n8k16: lane = 4 g + t; a0: A[g][2t..2t+1], a1: A[g+8][2t..], a2: A[g][2t+8..],
        a3: A[g+8][2t+8..]; b0: B[2t..2t+1][g], b1: B[2t+8..2t+9][g]; c0,c1: C[g][2t..2t+1], c2,c3: C[g+8][..]."""
        d, a, b, c = ([x.strip() for x in arg.strip("{}").split(",")] for arg in args)
        A = [[0.0] * 16 for _ in range(16)]
        B = [[0.0] * 8 for _ in range(16)]
        C = [[0.0] * 8 for _ in range(16)]
        for lane in range(32):
            r, g, t = regs[lane], lane // 4, lane % 4
            av = [self._val(r, x) for x in a]
            bv = [self._val(r, x) for x in b]
            cv = [self._val(r, x) for x in c]
            for i, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
                A[row][col] = _half_to_float(av[i], kind)
                A[row][col + 1] = _half_to_float(av[i] >> 16, kind)
            for i, k0 in enumerate((2 * t, 2 * t + 8)):
                B[k0][g] = _half_to_float(bv[i], kind)
                B[k0 + 1][g] = _half_to_float(bv[i] >> 16, kind)
            for i, (row, col) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
                C[row][col] = bits_to_f32(cv[i])
        D = [[sum(A[i][k] * B[k][j] for k in range(16)) + C[i][j] for j in range(8)] for i in range(16)]
        for lane in range(32):
            r, g, t = regs[lane], lane // 4, lane % 4
            for i, (row, col) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
                r[d[i]] = _f32_bits(D[row][col])
