#!/bin/bash
# Round 27: the 32k needles with the exact choice (every far block a candidate: the exact max q.k picks the
# 8 read), teacher-forced with which heads chose the needle's block (needle_choice.py). Is what is left at
# 32k the choice (then the oracle finds them) or the reading (then it does not)? Round 25's misses first.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r27
B=runs/study/train/retrieve-b64-c32
log() { date -u +"%F %T $*" >> runs/r27/times.log; }
for d in 0.9 0.1 0.5; do
  log "needle_choice 32k share 1.0 depth $d start"
  .venv/bin/python benchmarks/needle_choice.py $B/adapter --set rope=axis --set retrieve_candidate_share=1.0 --lengths 32k \
    --depths $d --seeds 0,1 --threads 2 --out runs/r27/nc-32k-share1.0-d$d.json > runs/r27/nc-32k-share1.0-d$d.log 2>&1
  log "needle_choice 32k share 1.0 depth $d done rc $?"
done
echo done > runs/r27/chain.done
