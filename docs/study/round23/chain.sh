#!/bin/bash
# Round 23: does the choice keep improving with candidates past 128 at 32k? Seed 1 (chosen but read wrong with 128).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r23
B=runs/study/train/retrieve-b64-c32
P=".venv/bin/python benchmarks/needle_choice.py $B/adapter --set rope=axis --set retrieve_candidates=256 --lengths 32k --threads 2"
date -u +"%F %T needle 32k c256 s1 start" >> runs/r23/times.log
$P --depths 0.1,0.5,0.9 --seeds 1 --out runs/r23/nc-32k-c256-s1.json > runs/r23/nc-32k-c256-s1.log 2>&1
date -u +"%F %T needle 32k c256 s1 done rc $?" >> runs/r23/times.log
echo done > runs/r23/chain.done
