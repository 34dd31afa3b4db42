#!/bin/bash
# Round 31: the growing far bias (0 nats up to 8,192 tokens, +0.5 nat per doubling: 1.5 nats at 64k, 2 at 128k)
# zero-shot on the default model where round 30 did not run it: perplexity on the long held-out document's first
# 64k and 128k tokens (bias 0: 7.86 / 7.80, rounds 21 / 24), the passkey at 128k (bias 0: 3 / 3, round 24), farthest
# depth first; then a fixed 1 nat at 64k, for the comparison.
# Ran in round 31 up to the passkey at depth 0.1; the steps after it (ppl 64k bias 1, passkeys 0.5 / 0.9) were
# stopped for the round's CI run, and the passkey pass was paused (SIGSTOP) for 27 minutes during an earlier one.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r31
log() { date -u +"%F %T $*" >> runs/r31/times.log; }
D=runs/study/train/retrieve-b64-c32
G="--set retrieve_bias_from=8192 --set retrieve_bias_growth=0.5"
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
log "ppl 64k,128k growth 0.5 start"
.venv/bin/ctxext eval $D/adapter --set rope=axis $G --tasks ppl --lengths 64k,128k --data "$DATA" \
  --docs 1 --out runs/r31/eval-ppl-g0.5 --force > runs/r31/eval-ppl-g0.5.log 2>&1
log "ppl 64k,128k growth 0.5 done rc $?"
passkey() {  # depth
  log "passkey 128k depth $1 growth 0.5 start"
  .venv/bin/ctxext eval $D/adapter --set rope=axis $G --tasks passkey --lengths 128k --depths $1 --trials 1 \
    --out runs/r31/passkey-g0.5-d$1 --force > runs/r31/passkey-g0.5-d$1.log 2>&1
  log "passkey 128k depth $1 growth 0.5 done rc $?"
}
passkey 0.1
log "ppl 64k bias 1 start"
.venv/bin/ctxext eval $D/adapter --set rope=axis --set retrieve_bias=1 --tasks ppl --lengths 64k --data "$DATA" \
  --docs 1 --out runs/r31/eval-ppl-b1 --force > runs/r31/eval-ppl-b1.log 2>&1
log "ppl 64k bias 1 done rc $?"
passkey 0.5
passkey 0.9
echo done > runs/r31/chain.done
