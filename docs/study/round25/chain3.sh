#!/bin/bash
# Round 25, after chain2.sh: round 24's float32 prefix check with the shipped choice again, kept as JSON this time.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r25
while [ ! -f runs/r25/chain2.done ]; do sleep 30; done
B=runs/study/train/retrieve-b64-c32
log() { date -u +"%F %T $*" >> runs/r25/times.log; }
log "prefix float32 retrieve=default start"
.venv/bin/python benchmarks/prefix_check.py $B/adapter --set rope=axis --threads 2 \
  --out runs/r25/prefix-float32-retrievedefault.json > runs/r25/prefix-float32-retrievedefault.log 2>&1
log "prefix float32 retrieve=default done rc $?"
echo done > runs/r25/chain3.done
