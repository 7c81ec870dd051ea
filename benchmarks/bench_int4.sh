#!/usr/bin/env bash
# Issue 6's int4 measurements on one GPU, in one device call (docs/benchmarks.md, "int4 on the tensor cores").
#
#   bash benchmarks/bench_int4.sh OUT_DIR [PHASE ...]
#
# Phases (default: tests latency roofline, 8-9 min; each has its own time limit; results land in OUT_DIR):
#   tests     the CUDA tests of the int4 tensor-core kernel and of PDL (tests/quant/test_int4_mma*.py,
#             tests/kernels/test_pdl.py)
#   kernel    benchmarks/check_int4_mma.py --quick: correctness (M = 1..64) and the M = 1 and 16 sweeps;
#             prints the FRAMEWORK_INT4_MMA_TUNED line of the best configs
#   extended  the same with --extended: prefetch depth, eviction policy, PDL on a few program shapes
#   inflight  the same with --inflight (M = 1): warps over 2 tile rows, xjit, barrier (and depth 2) on 12 program
#             shapes, one split; its tuned configs feed the latency phase as the kernel phase's do
#   ring      the same with --ring (M = 1): the ring of two register sets, plain, with xjit or a barrier, against
#             the table's programs; correctness checks of the ring programs only; feeds the latency phase too
#   interleave  the same with --interleave (M = 1 and 16): the table's and the ring's best programs with slices
#             interleaved or not; checks the ring and interleave programs only; feeds the latency phase too
#   deep      the same with --deep (M = 1): the ring with 32-64 superblock loads a program a step, up to 8 warps;
#             checks the ring programs only; feeds the latency phase too
#   latency   framework bench latency at batch 1, 16, 32, 64, 256 (prompt 128, output 128): bf16 and GPTQ (AWQ
#             runs the same kernels) as configured by default (programmatic dependent launches for steps of up
#             to 8 rows: FRAMEWORK_PDL=auto), GPTQ with SiLU-and-mul fused into gate/up
#             (FRAMEWORK_INT4_FUSED_SILU=1), then bf16 and GPTQ with every decode kernel launched as a programmatic
#             dependent (FRAMEWORK_PDL=1); VARIANTS="bf16 gptq ..." picks some (also bf16_nopdl, gptq_nopdl:
#             FRAMEWORK_PDL=0; gptq_pdl_rest: PDL for all but the int4 kernel; gptq_silu_cap: the fused gate with
#             its 17-32 row program capped at 128 registers), BATCHES="1 16" the batch sizes; with the tuned
#             configs of the kernel phase when it ran in the same call (TUNED=0 in the environment: without
#             them); 30-80 s each
#   roofline  benchmarks/roofline.py: copy bandwidth for the floors
set -u
OUT=${1:?usage: bench_int4.sh OUT_DIR [PHASE ...]}
shift
PHASES=${*:-tests latency roofline}
MODEL=${MODEL:-/tmp/llama3-8b}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
ENGINE=(--load-format dummy --dtype bfloat16 --max-model-len 2048)

[ -f "$MODEL/config.json" ] || python3 benchmarks/dummy_model.py llama3-8b "$MODEL" >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
git log --oneline -1 2>/dev/null | tee -a "$OUT/device.txt"
date -u +%FT%TZ | tee -a "$OUT/device.txt"

PHASE_SUMMARY='^\{|^FRAMEWORK_|passed|failed|correctness|error|Error|copy bandwidth'
PHASE_LINES=24
# shellcheck source=benchmarks/phase.sh
. benchmarks/phase.sh

latency() {  # latency NAME [ENV=VALUE ...] -- [framework args ...]
    local name=$1
    shift
    local envs=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    phase "latency_$name" 150 env ${envs[@]+"${envs[@]}"} python3 -m framework bench latency "$MODEL" "${ENGINE[@]}" \
        --batch-sizes ${BATCHES:-1 16 32 64 256} --input-len 128 --output-len 128 --num-iters 3 "$@" \
        --output-json "$OUT/latency_$name.json"
}

for p in $PHASES; do
    case $p in
    tests) phase tests 480 python3 -m pytest -q -x tests/quant/test_int4_mma.py tests/quant/test_int4_mma_programs.py tests/kernels/test_pdl.py ;;
    kernel) phase kernel 400 python3 -W ignore benchmarks/check_int4_mma.py --quick --out "$OUT/kernel" ;;
    extended) phase extended 300 python3 -W ignore benchmarks/check_int4_mma.py --extended --out "$OUT/extended" ;;
    ring) phase ring 420 python3 -W ignore benchmarks/check_int4_mma.py --ring --checks ring --out "$OUT/kernel" ;;
    interleave) phase interleave 420 python3 -W ignore benchmarks/check_int4_mma.py --interleave --checks ring,interleave \
        --out "$OUT/kernel" ;;
    deep) phase deep 450 python3 -W ignore benchmarks/check_int4_mma.py --deep --checks ring --out "$OUT/kernel" ;;
    inflight) phase inflight 300 python3 -W ignore benchmarks/check_int4_mma.py --inflight --out "$OUT/kernel" ;;
    latency)
        TUNED_ENV=""
        if [ "${TUNED:-1}" != 0 ] && [ -f "$OUT/kernel/int4_mma.json" ]; then
            TUNED_ENV=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['tuned_env'])" "$OUT/kernel/int4_mma.json")
        fi
        T="FRAMEWORK_INT4_MMA_TUNED=$TUNED_ENV"
        for v in ${VARIANTS:-bf16 gptq gptq_silu bf16_pdl gptq_pdl}; do
            case $v in
            bf16) latency bf16 -- ;;
            gptq) latency gptq "$T" -- --quantization gptq ;;
            bf16_pdl) latency bf16_pdl FRAMEWORK_PDL=1 -- ;;
            bf16_nopdl) latency bf16_nopdl FRAMEWORK_PDL=0 -- ;;
            gptq_nopdl) latency gptq_nopdl "$T" FRAMEWORK_PDL=0 -- --quantization gptq ;;
            gptq_pdl) latency gptq_pdl "$T" FRAMEWORK_PDL=1 -- --quantization gptq ;;
            gptq_silu) latency gptq_silu "$T" FRAMEWORK_INT4_FUSED_SILU=1 -- --quantization gptq ;;
            gptq_silu_cap)  # the fused gate, its 17-32 row gate/up program capped at 128 registers (4 programs an SM)
                latency gptq_silu_cap FRAMEWORK_INT4_FUSED_SILU=1 "FRAMEWORK_INT4_MMA_TUNED=$(python3 -c 'import json, sys
from plugins.quant.int4_mma_tuned import TUNED
env = json.loads(sys.argv[1] or "{}")
env["28672x4096x32"] = {**TUNED[(28672, 4096, 32)], "maxnreg": 128}
print(json.dumps(env))' "$TUNED_ENV")" -- --quantization gptq ;;
            gptq_pdl_rest)  # every decode kernel a programmatic dependent but the int4 one
                latency gptq_pdl_rest FRAMEWORK_PDL=1 "FRAMEWORK_INT4_MMA_TUNED=$(python3 -c 'import json; from plugins.quant.int4_mma_tuned import TUNED, DEFAULT
print(json.dumps({"x".join(map(str, k)): {**v, "pdl": False} for k, v in TUNED.items()}))')" -- --quantization gptq ;;
            *) echo "unknown latency variant $v" ;;
            esac
        done
        ;;
    roofline) phase roofline 60 python3 benchmarks/roofline.py --shape llama3-8b --workload w1 --max-num-seqs 256 ;;
    *) echo "unknown phase $p" ;;
    esac
done
