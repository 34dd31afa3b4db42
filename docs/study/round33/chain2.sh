#!/bin/bash
# Round 33: chain.sh's rest, reordered (chain.sh's bash was stopped during its first passkey, which ran on): the
# 128k passkey at depth 0.1 is dropped, since round 32's probe already scored it teacher-forced at exactly this
# setting (found, ` 73366`); in its place the last 32k needle (depth 0.1, seed 1, missed by every variant since
# round 25), teacher-forced from one prefill (far_share.py: its bias-0 variant is the setting itself), with half
# the far blocks as candidates as in round 32's needles, and 0.5 nat more at the question beside it.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r33
log() { date -u +"%F %T $*" >> runs/r33/times.log; }
D=runs/study/train/retrieve-b64-c32
G="--set retrieve_bias_growth=0.5 --set retrieve_bias_cap=0.5"  # the growth starts at the model's context (8192)
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
while pgrep -f "passkey-cap0.5-d0.5" > /dev/null; do sleep 10; done
log "passkey 128k depth 0.5 growth 0.5 cap 0.5 done (chain.sh's)"
passkey() {  # depth
  log "passkey 128k depth $1 growth 0.5 cap 0.5 start"
  .venv/bin/ctxext eval $D/adapter --set rope=axis $G --tasks passkey --lengths 128k --depths $1 --trials 1 \
    --out runs/r33/passkey-cap0.5-d$1 --force > runs/r33/passkey-cap0.5-d$1.log 2>&1
  log "passkey 128k depth $1 growth 0.5 cap 0.5 done rc $?"
}
passkey 0.9
log "ppl 128k growth 0.5 cap 0.5 start"
.venv/bin/ctxext eval $D/adapter --set rope=axis $G --tasks ppl --lengths 128k --data "$DATA" \
  --docs 1 --out runs/r33/eval-ppl-cap0.5 --force > runs/r33/eval-ppl-cap0.5.log 2>&1
log "ppl 128k growth 0.5 cap 0.5 done rc $?"
log "far_share needle 32k d0.1 seed 1 growth 0.5 cap 0.5, question +0,0.5 start"
.venv/bin/python benchmarks/far_share.py $D/adapter --set rope=axis $G --set retrieve_candidate_share=0.5 \
  --task needle --lengths 32k --depths 0.1 --seeds 1 --bias 0,0.5 --threads 2 \
  --out runs/r33/fs-needle-d0.1-s1.json --plot runs/r33/fs-needle-d0.1-s1.png > runs/r33/fs-needle-d0.1-s1.log 2>&1
log "far_share needle 32k d0.1 seed 1 done rc $?"
echo done > runs/r33/chain2.done
