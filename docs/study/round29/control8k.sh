#!/bin/bash
# Round 29: the 8k needle the bias lost (depth 0.5, seed 0), side by side: the default model at bias 0 (round 15
# found it) and the model trained with the bias.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r29
log() { date -u +"%F %T $*" >> runs/r29/times.log; }
P=".venv/bin/python benchmarks/needle_choice.py --set rope=axis --depths 0.5 --seeds 0 --threads 1 --lengths 8k"
log "needle_choice 8k d0.5 s0 default bias 0 start"
$P runs/study/train/retrieve-b64-c32/adapter --set retrieve_bias=0 --out runs/r29/nc-8k-d0.5-default-b0.json > runs/r29/nc-8k-d0.5-default-b0.log 2>&1
log "needle_choice 8k d0.5 s0 default bias 0 done rc $?"
log "needle_choice 8k all trained-bias1 start"
.venv/bin/python benchmarks/needle_choice.py --set rope=axis --depths 0.1,0.5,0.9 --seeds 0,1 --threads 1 --lengths 8k \
  runs/study/train/retrieve-b64-c32-bias1/adapter --out runs/r29/nc-8k-tb1.json > runs/r29/nc-8k-tb1.log 2>&1
log "needle_choice 8k all trained-bias1 done rc $?"
