#!/bin/bash
# Round 29, replacing chain3.sh after its depth-0.1 needles: before round 28's missing depth 0.5, the 8k needles
# teacher-forced with the bias (round 15's command; 5 / 6, 46 / 48 answer tokens without it): does 1 nat, on
# every query, lose anything at 4 T, where the default model already finds 5 of 6?
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r29
log() { date -u +"%F %T $*" >> runs/r29/times.log; }
while pgrep -f "out runs/r29/needle-tb1-d0.1" > /dev/null; do sleep 20; done
log "needles 32k trained-bias1 depth 0.1 bias 1 done"
D=runs/study/train/retrieve-b64-c32
log "needle_choice 8k default bias 1 start"
.venv/bin/python benchmarks/needle_choice.py $D/adapter --set rope=axis --set retrieve_bias=1 --depths 0.1,0.5,0.9 \
  --seeds 0,1 --threads 2 --lengths 8k --out runs/r29/nc-8k-default-b1.json > runs/r29/nc-8k-default-b1.log 2>&1
log "needle_choice 8k default bias 1 done rc $?"
log "needles 32k default depth 0.5 bias 1 start"
.venv/bin/ctxext eval $D/adapter --tasks needle --scoring generate --lengths 32k --depths 0.5 --trials 2 \
  --set rope=axis --set retrieve_candidate_share=0.5 --set retrieve_bias=1 --out runs/r29/needle-default-d0.5-b1 \
  --force > runs/r29/needle-default-d0.5-b1.log 2>&1
log "needles 32k default depth 0.5 bias 1 done rc $?"
echo done > runs/r29/chain4.done
