#!/bin/bash
# Round 30, first: round 29's never-run cell, the 32k needles at depth 0.5 with the zero-shot bias of 1 nat
# on the default model (half the far blocks as candidates, as for depths 0.1 and 0.9 in round 29).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r30
log() { date -u +"%F %T $*" >> runs/r30/times.log; }
D=runs/study/train/retrieve-b64-c32
log "needles 32k default depth 0.5 bias 1 start"
.venv/bin/ctxext eval $D/adapter --tasks needle --scoring generate --lengths 32k --depths 0.5 --trials 2 \
  --set rope=axis --set retrieve_candidate_share=0.5 --set retrieve_bias=1 --out runs/r30/needle-default-d0.5-b1 \
  --force > runs/r30/needle-default-d0.5-b1.log 2>&1
log "needles 32k default depth 0.5 bias 1 done rc $?"
echo done > runs/r30/chain.done
