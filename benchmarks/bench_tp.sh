#!/usr/bin/env bash
# The tensor-parallel benchmarks of docs/benchmarks.md (issue 8), on one host of 4 GPUs.
#
#   bash benchmarks/bench_tp.sh OUT_DIR [PHASE ...]
#
# Phases (default: small tp2 tp4, in this order). Jobs inside a phase run at the same
# time on disjoint GPUs (CUDA_VISIBLE_DEVICES); each job has its own time
# limit and log under OUT_DIR:
#   small   GPUs 0,1: Llama-3-8B shape at TP=2 | GPU 2: the same at TP=1 |
#           GPU 3: the transformers peer (static-cache generate, batch 256)
#   tp2     GPUs 0,1: Llama-3-70B shape at TP=2 | GPUs 2,3: all-reduce timing
#           (2 ranks), then the rooflines of 8B at TP=1/2 and 70B at TP=2
#   tp4     all-reduce timing (4 ranks), the 70B roofline at TP=4, then the 70B
#           shape at TP=4, then benchmarks/check_tensor_parallel.py
#   optin   benchmarks/check_tensor_parallel.py (it runs the opt-in switches), all-reduce
#           timing (4 ranks), then batch-1 latency with and without each switch: the 70B
#           shape at TP=4 and the 8B shape at TP=2 (FRAMEWORK_SYMM_MEM_ALLREDUCE), the 8B
#           shape at PP=2 (FRAMEWORK_PP_CUDA_GRAPHS)
# All-reduce timing covers NCCL and the peer-memory one-shot (symm_allreduce.py); the
# floors add the one the engine uses (FRAMEWORK_SYMM_MEM_ALLREDUCE=1: the one-shot).
# Each model run is `framework bench latency` at batch 1 (prompt 128, output
# 128, CUDA graphs) and `framework bench throughput` on W1 (1000 requests,
# prompts U[64, 1024], outputs U[16, 512]), bf16 dummy weights.
set -u
OUT=${1:?usage: bench_tp.sh OUT_DIR [PHASE ...]}
shift
PHASES=${*:-small tp2 tp4}  # optin: on request only
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
ENGINE=(--load-format dummy --dtype bfloat16 --max-model-len 2048)
W1=(--num-prompts 1000 --input-len-range 64 1024 --output-len-range 16 512 --dataset-seed 0 --max-num-seqs 256)

for shape in llama3-8b llama3-70b; do
    [ -f "/tmp/$shape/config.json" ] || python3 benchmarks/dummy_model.py "$shape" "/tmp/$shape" >/dev/null
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
nvidia-smi topo -m >>"$OUT/device.txt" 2>&1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'nccl', torch.cuda.nccl.version())" | tee -a "$OUT/device.txt"
date -u +%FT%TZ | tee -a "$OUT/device.txt"

job() {  # job NAME GPUS SECONDS COMMAND...: run on those GPUs, log to OUT/NAME.log
    local name=$1 gpus=$2 limit=$3
    shift 3
    local start=$SECONDS
    CUDA_VISIBLE_DEVICES=$gpus timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name (GPUs $gpus): rc=$? in $((SECONDS - start)) s: $*"
}

latency() {  # latency NAME GPUS SECONDS SHAPE [ENGINE ARGS...]: batch-1 decode, prompt 128, output 128
    local name=$1 gpus=$2 limit=$3 shape=/tmp/$4
    shift 4
    job "${name}_latency" "$gpus" "$limit" python3 -m framework bench latency "$shape" "${ENGINE[@]}" "$@" \
        --batch-sizes 1 --input-len 128 --output-len 128 --num-iters 3 --output-json "$OUT/${name}_latency.json"
}

model() {  # model NAME GPUS TP SHAPE SECONDS_LATENCY SECONDS_W1
    local name=$1 gpus=$2 tp=$3 shape=$4
    latency "$name" "$gpus" "$5" "$shape" --tensor-parallel-size "$tp"
    job "${name}_w1" "$gpus" "$6" python3 -m framework bench throughput "/tmp/$shape" "${ENGINE[@]}" "${W1[@]}" \
        --tensor-parallel-size "$tp" --output-json "$OUT/${name}_w1.json"
}

allreduce_us() {  # allreduce_us WORLD HIDDEN: the graphed batch-1 step time measured by bench_allreduce.py
    python3 - "$OUT/allreduce.jsonl" "$1" "$2" <<'EOF'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
impl = "symm" if os.environ.get("FRAMEWORK_SYMM_MEM_ALLREDUCE") == "1" else "nccl"  # what the engine uses
hits = [r for r in rows if r.get("world_size") == int(sys.argv[2]) and r.get("hidden") == int(sys.argv[3])
        and r.get("tokens") == 1 and "graph_step_us" in r and r.get("impl", "nccl") == impl]
print(hits[-1]["graph_step_us"] if hits else 0.0)
EOF
}

rooflines() {  # rooflines GPU SHAPE:TP...
    local gpu=$1
    shift
    for spec in "$@"; do
        local shape=${spec%:*} tp=${spec#*:} hidden=8192 layers=80
        [ "$shape" = llama3-8b ] && hidden=4096 && layers=32
        local us=0
        [ "$tp" -gt 1 ] && us=$(allreduce_us "$tp" "$hidden")
        CUDA_VISIBLE_DEVICES=$gpu python3 benchmarks/roofline.py --shape "$shape" --workload w1 \
            --tensor-parallel-size "$tp" --allreduce-step-us "$us" | grep '^{' >>"$OUT/roofline.jsonl"
    done
}

allreduce() {  # allreduce GPUS WORLD
    CUDA_VISIBLE_DEVICES=$1 python3 benchmarks/bench_allreduce.py --world-sizes "$2" --hidden 4096 --layers 32 \
        --tokens 1 256 --impl nccl symm 2>&1 | grep '^{' >>"$OUT/allreduce.jsonl"
    CUDA_VISIBLE_DEVICES=$1 python3 benchmarks/bench_allreduce.py --world-sizes "$2" --hidden 8192 --layers 80 \
        --tokens 1 256 --impl nccl symm 2>&1 | grep '^{' >>"$OUT/allreduce.jsonl"
}

for p in $PHASES; do
    start=$SECONDS
    case $p in
    small)
        model llama8b_tp2 0,1 2 llama3-8b 120 200 &
        model llama8b_tp1 2 1 llama3-8b 120 200 &
        job peer 3 300 python3 benchmarks/hf_peer.py --shape llama3-8b --batch-sizes 256 --requests 256 \
            --new-tokens 256 --skip-continuous &
        wait ;;
    tp2)
        model llama70b_tp2 0,1 2 llama3-70b 200 300 &
        { allreduce 2,3 2; rooflines 2 llama3-8b:1 llama3-8b:2 llama3-70b:2; } &
        wait ;;
    tp4)
        allreduce 0,1,2,3 4
        rooflines 0 llama3-70b:4
        model llama70b_tp4 0,1,2,3 4 llama3-70b 150 200
        job check_tp 0,1,2,3 240 python3 benchmarks/check_tensor_parallel.py ;;
    optin) # the opt-in switches: correctness (check_tensor_parallel runs them), then what they buy at batch 1
        job check_tp 0,1,2,3 300 python3 benchmarks/check_tensor_parallel.py
        allreduce 0,1,2,3 4
        # NCCL inside graphs was slower than eager (27 against 17 us a call at 8192 wide): time it without
        # graph-mixing support. The engine could not use that as it is: its eager logits all-gather runs on
        # the TP communicator while the replay is outstanding (it would need a communicator of its own).
        NCCL_GRAPH_MIXING_SUPPORT=0 allreduce 0,1,2,3 4
        latency llama70b_tp4_nccl 0,1,2,3 150 llama3-70b --tensor-parallel-size 4
        FRAMEWORK_SYMM_MEM_ALLREDUCE=1 latency llama70b_tp4_symm 0,1,2,3 150 llama3-70b --tensor-parallel-size 4
        {
            latency llama8b_tp2_nccl 0,1 120 llama3-8b --tensor-parallel-size 2
            FRAMEWORK_SYMM_MEM_ALLREDUCE=1 latency llama8b_tp2_symm 0,1 120 llama3-8b --tensor-parallel-size 2
        } &
        {
            latency llama8b_pp2_eager 2,3 120 llama3-8b --pipeline-parallel-size 2
            FRAMEWORK_PP_CUDA_GRAPHS=1 latency llama8b_pp2_graphs 2,3 120 llama3-8b --pipeline-parallel-size 2
        } &
        wait ;;
    *) echo "unknown phase $p" ;;
    esac
    echo "=== phase $p: $((SECONDS - start)) s"
done
for f in "$OUT"/*_latency.json "$OUT"/*_w1.json; do
    [ -f "$f" ] && python3 -c "import json, sys; d = json.load(open(sys.argv[1])); d.pop('engine', None); \
print(sys.argv[1], json.dumps(d))" "$f"
done
cat "$OUT"/allreduce.jsonl "$OUT"/roofline.jsonl 2>/dev/null
grep -h "^{" "$OUT"/peer.log 2>/dev/null | tail -5
tail -12 "$OUT"/check_tp.log 2>/dev/null
