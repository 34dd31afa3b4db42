#!/bin/bash
# Round 34, after chain2.sh: what a quarter share of the far blocks as candidates costs past 32k, where round 23
# stopped (1.45x the shipped choice's attention call at 32k): one layer at SmolLM2's shape, CPU, 2 threads.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r34
log() { date -u +"%F %T $*" >> runs/r34/times.log; }
while [ ! -f runs/r34/chain2.done ]; do sleep 10; done
log "candidates_cost 64k,128k C=32 s=0.25 start"
.venv/bin/python benchmarks/candidates_cost.py --lengths 64k,128k --candidates 32 --shares 0.25 --repeats 2 \
  --threads 2 --out runs/r34/candidates_cost.json > runs/r34/candidates_cost.log 2>&1
log "candidates_cost done rc $?"
echo done > runs/r34/chain3.done
