#!/bin/bash
# Round 27, after chain.sh's depth-0.9 pair (the rest of chain.sh was stopped): the same two needles with
# half the far blocks as candidates (round 25's setting), (1) with every head reading the needle's far
# block on the answer's queries (--read-needle, an oracle), (2) reading 16 far blocks instead of 8.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r27
while [ ! -f runs/r27/nc-32k-share1.0-d0.9.json ]; do sleep 30; done
B=runs/study/train/retrieve-b64-c32
log() { date -u +"%F %T $*" >> runs/r27/times.log; }
P=".venv/bin/python benchmarks/needle_choice.py $B/adapter --set rope=axis --set retrieve_candidate_share=0.5 --lengths 32k --depths 0.9 --seeds 0,1 --threads 2"
log "needle_choice 32k share 0.5 read-needle depth 0.9 start"
$P --read-needle --out runs/r27/nc-32k-share0.5-read-d0.9.json > runs/r27/nc-32k-share0.5-read-d0.9.log 2>&1
log "needle_choice 32k share 0.5 read-needle depth 0.9 done rc $?"
log "needle_choice 32k share 0.5 retrieve 16 depth 0.9 start"
$P --set retrieve=16 --out runs/r27/nc-32k-share0.5-r16-d0.9.json > runs/r27/nc-32k-share0.5-r16-d0.9.log 2>&1
log "needle_choice 32k share 0.5 retrieve 16 depth 0.9 done rc $?"
echo done > runs/r27/chain2.done
