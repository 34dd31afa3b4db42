#!/bin/bash
# Round 33: the growth capped at 0.5 nat (0 nats up to 8,192 tokens, +0.5 nat per doubling, at most 0.5 nat: from
# 16k on) zero-shot on the default model at 128k, the evidence round 32 said a default needs: the passkeys at depths
# 0.5 / 0.9 (bias 0 finds both; round 31's uncapped growth found both too), perplexity at 128k (bias 0 7.80, uncapped
# 7.42), then the passkey at depth 0.1 that round 32's probe found from the first answer token only.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r33
log() { date -u +"%F %T $*" >> runs/r33/times.log; }
D=runs/study/train/retrieve-b64-c32
G="--set retrieve_bias_growth=0.5 --set retrieve_bias_cap=0.5"  # the growth starts at the model's context (8192)
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
passkey() {  # depth
  log "passkey 128k depth $1 growth 0.5 cap 0.5 start"
  .venv/bin/ctxext eval $D/adapter --set rope=axis $G --tasks passkey --lengths 128k --depths $1 --trials 1 \
    --out runs/r33/passkey-cap0.5-d$1 --force > runs/r33/passkey-cap0.5-d$1.log 2>&1
  log "passkey 128k depth $1 growth 0.5 cap 0.5 done rc $?"
}
passkey 0.5
passkey 0.9
log "ppl 128k growth 0.5 cap 0.5 start"
.venv/bin/ctxext eval $D/adapter --set rope=axis $G --tasks ppl --lengths 128k --data "$DATA" \
  --docs 1 --out runs/r33/eval-ppl-cap0.5 --force > runs/r33/eval-ppl-cap0.5.log 2>&1
log "ppl 128k growth 0.5 cap 0.5 done rc $?"
passkey 0.1
echo done > runs/r33/chain.done
