#!/bin/bash
# Round 25, after chain4.sh: the two generated misses at depth 0.9, teacher-forced with the same candidates
# (half the far blocks), with which heads chose the needle's block (needle_choice.py).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r25
while [ ! -f runs/r25/chain4.done ]; do sleep 30; done
B=runs/study/train/retrieve-b64-c32
log() { date -u +"%F %T $*" >> runs/r25/times.log; }
log "needle_choice 32k share 0.5 depth 0.9 start"
.venv/bin/python benchmarks/needle_choice.py $B/adapter --set rope=axis --set retrieve_candidate_share=0.5 --lengths 32k \
  --depths 0.9 --seeds 0,1 --threads 2 --out runs/r25/nc-32k-share0.5-d9.json > runs/r25/nc-32k-share0.5-d9.log 2>&1
log "needle_choice 32k share 0.5 depth 0.9 done rc $?"
echo done > runs/r25/chain5.done
