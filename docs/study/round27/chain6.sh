#!/bin/bash
# Round 27, after chain5.sh: full attention with yarn x4 fine-tuned the same way at 2k (round 4's `full-yarn`)
# on seed 0's depth-0.9 needle at 32k and its 8k cut, as a control for the first answer token.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r27
while [ ! -f runs/r27/chain5.done ]; do sleep 30; done
log() { date -u +"%F %T $*" >> runs/r27/times.log; }
log "needle_choice full-yarn 32k shorten 8k depth 0.9 seed 0 start"
.venv/bin/python benchmarks/needle_choice.py runs/study/train/full-yarn/adapter --lengths 32k --depths 0.9 --seeds 0 \
  --shorten 8k --threads 2 --out runs/r27/nc-full-yarn-shorten-d0.9.json > runs/r27/nc-full-yarn-shorten-d0.9.log 2>&1
log "needle_choice full-yarn 32k shorten 8k depth 0.9 seed 0 done rc $?"
echo done > runs/r27/chain6.done
