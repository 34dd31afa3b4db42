#!/bin/bash
# Round 33, after the round's CI run: a second 128k passkey at depth 0.1 (seed 1; round 32's was seed 0) under the
# new default (growth 0.5 capped at 0.5), teacher-forced from one prefill (far_share.py: its bias-0 variant is the
# setting itself), with 0.25 / 0.5 nat more at the question beside it for the margin.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r33
log() { date -u +"%F %T $*" >> runs/r33/times.log; }
D=runs/study/train/retrieve-b64-c32
while ! grep -q "^rc " /tmp/ci.log 2>/dev/null; do sleep 10; done
log "far_share passkey 128k d0.1 seed 1 growth 0.5 cap 0.5, question +0,0.25,0.5 start"
.venv/bin/python benchmarks/far_share.py $D/adapter --set rope=axis --set retrieve_bias_growth=0.5 \
  --set retrieve_bias_cap=0.5 --task passkey --lengths 128k --depths 0.1 --seeds 1 --bias 0,0.25,0.5 --threads 2 \
  --out runs/r33/fs-passkey-d0.1-s1.json --plot runs/r33/fs-passkey-d0.1-s1.png > runs/r33/fs-passkey-d0.1-s1.log 2>&1
log "far_share passkey 128k d0.1 seed 1 done rc $?"
echo done > runs/r33/chain3.done
