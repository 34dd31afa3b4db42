#!/bin/bash
# Round 25, after chain.sh: the prefix check in float64, with the shipped far-block choice and without it.
# If the float32 differences (round 24; retrieve=0 above) are rounding, float64 leaves almost nothing.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r25
while [ ! -f runs/r25/chain.done ]; do sleep 30; done
B=runs/study/train/retrieve-b64-c32
log() { date -u +"%F %T $*" >> runs/r25/times.log; }
for r in default 0; do
  extra=(); [ "$r" = 0 ] && extra=(--set retrieve=0)
  log "prefix float64 retrieve=$r start"
  .venv/bin/python benchmarks/prefix_check.py $B/adapter --set rope=axis "${extra[@]}" --float64 --threads 2 \
    --out runs/r25/prefix-float64-retrieve$r.json > runs/r25/prefix-float64-retrieve$r.log 2>&1
  log "prefix float64 retrieve=$r done rc $?"
done
echo done > runs/r25/chain2.done
