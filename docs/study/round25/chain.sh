#!/bin/bash
# Round 25 (CPU): (1) is the prefix difference of round 24 in the far path? The same check with retrieval off.
# (2) the 32k needles scored the way a user scores them (`--scoring generate`: greedy decode, leading whitespace
# stripped), with candidates half of each query's far blocks (about 254 at 32k for the answer's tokens).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r25
B=runs/study/train/retrieve-b64-c32
log() { date -u +"%F %T $*" >> runs/r25/times.log; }
log "prefix retrieve=0 start"
.venv/bin/python benchmarks/prefix_check.py $B/adapter --set rope=axis --set retrieve=0 --threads 2 \
  --out runs/r25/prefix-retrieve0.json > runs/r25/prefix-retrieve0.log 2>&1
log "prefix retrieve=0 done rc $?"
for share in 0.5; do
  log "needle 32k generate share $share start"
  .venv/bin/ctxext eval $B/adapter --tasks needle --scoring generate --lengths 32k --depths 0.1,0.5,0.9 --trials 2 \
    --set rope=axis --set retrieve_candidate_share=$share --out runs/r25/eval-needle-32k-share$share --force \
    > runs/r25/eval-needle-32k-share$share.log 2>&1
  log "needle 32k generate share $share done rc $?"
done
echo done > runs/r25/chain.done
