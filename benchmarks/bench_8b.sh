#!/usr/bin/env bash
# The Llama-3-8B-shape benchmarks of docs/benchmarks.md, in one run on one GPU.
#
#   bash benchmarks/bench_8b.sh OUT_DIR [PHASE ...]
#
# Phases (default: all, in this order; each has its own time limit so that
# one hang cannot eat the rest; every result lands in OUT_DIR):
#   cold        framework serve with dummy 8B weights and CUDA graphs, empty Triton cache:
#               seconds to GET /health 200, then bench serve (100 W1 prompts, all at once)
#   roofline    benchmarks/roofline.py: measured matmul rate and copy bandwidth, W1 roofline
#   graphs      benchmarks/check_cuda_graphs.py: greedy ids with and without graphs (tiny models)
#   profile     benchmarks/profile_engine_step.py at batch 256 (host phases, GPU idle share)
#   throughput  framework bench throughput: W1 (1000 requests, prompts U[64,1024], outputs U[16,512])
#   latency     framework bench latency: batch 1..256, prompt 128, output 128 (CUDA graphs)
#   eager       the same at batch 1 and 256 with --enforce-eager
#   plot        benchmarks/plot_throughput.py -> throughput_vs_batch.png
#   peer        benchmarks/hf_peer.py: transformers static-cache generate and generate_batch
set -u
OUT=${1:?usage: bench_8b.sh OUT_DIR [PHASE ...]}
shift
PHASES=${*:-cold roofline graphs profile throughput latency eager peer plot}
MODEL=${MODEL:-/tmp/llama3-8b}
PEER_BATCH_SIZES=${PEER_BATCH_SIZES:-64 256}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
ENGINE=(--load-format dummy --dtype bfloat16)
W1=(--num-prompts 1000 --input-len-range 64 1024 --output-len-range 16 512 --dataset-seed 0)

[ -f "$MODEL/config.json" ] || python3 benchmarks/dummy_model.py llama3-8b "$MODEL" >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
date -u +%FT%TZ | tee -a "$OUT/device.txt"

PHASE_SUMMARY='^\{|Throughput|===|\[graphs\]|    [A-Z][a-z]+\(|error|Error|ready_s|CUDA graphs|KV cache'
# shellcheck source=benchmarks/phase.sh
. benchmarks/phase.sh

for p in $PHASES; do
    case $p in
    cold) phase cold 150 python3 benchmarks/cold_start.py "$MODEL" --bench-prompts 100 --out "$OUT/cold" ;;
    roofline) phase roofline 60 python3 benchmarks/roofline.py --shape llama3-8b --workload w1 --max-num-seqs 256
        grep '^{' "$OUT/roofline.log" | tail -1 >"$OUT/roofline.json" ;;
    graphs) phase graphs 150 python3 benchmarks/check_cuda_graphs.py ;;
    profile) phase profile 120 python3 benchmarks/profile_engine_step.py "$MODEL" --batch 256 --prompt-len 512 \
        --steps 100 --output-json "$OUT/profile.json" ;;
    throughput) phase throughput 200 python3 -m framework bench throughput "$MODEL" "${ENGINE[@]}" "${W1[@]}" \
        --max-model-len 2048 --max-num-seqs 256 --output-json "$OUT/throughput.json" ;;
    latency) phase latency 150 python3 -m framework bench latency "$MODEL" "${ENGINE[@]}" --max-model-len 2048 \
        --batch-sizes 1 4 16 64 128 256 --input-len 128 --output-len 128 --num-iters 3 \
        --output-json "$OUT/latency.json" ;;
    eager) phase eager 100 python3 -m framework bench latency "$MODEL" "${ENGINE[@]}" --max-model-len 2048 \
        --batch-sizes 1 256 --input-len 128 --output-len 128 --num-iters 2 --enforce-eager \
        --output-json "$OUT/latency_eager.json" ;;
    plot) phase plot 60 python3 benchmarks/plot_throughput.py --latency "$OUT/latency.json" \
        --eager "$OUT/latency_eager.json" --roofline "$OUT/roofline.json" --peer "$OUT/peer.log" \
        --out "$OUT/throughput_vs_batch.png" ;;
    peer) # shellcheck disable=SC2086
        phase peer 300 python3 benchmarks/hf_peer.py --shape llama3-8b --batch-sizes $PEER_BATCH_SIZES \
        --requests 256 --new-tokens 256 ;;
    *) echo "unknown phase $p" ;;
    esac
done
