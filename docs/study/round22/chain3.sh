#!/bin/bash
# Round 22, after chain2.sh: the other four needles at 32k with 128 candidates (seed 0 depth 0.9; seed 1 all depths).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r22
while [ ! -f runs/r22/chain2.done ]; do sleep 30; done
B=runs/study/train/retrieve-b64-c32
P=".venv/bin/python benchmarks/needle_choice.py $B/adapter --set rope=axis --set retrieve_candidates=128 --lengths 32k --threads 2"
date -u +"%F %T needle 32k c128 rest start" >> runs/r22/times.log
$P --depths 0.9 --seeds 0 --out runs/r22/nc-32k-c128-s0d9.json > runs/r22/nc-32k-c128-s0d9.log 2>&1
$P --depths 0.1,0.5,0.9 --seeds 1 --out runs/r22/nc-32k-c128-s1.json > runs/r22/nc-32k-c128-s1.log 2>&1
date -u +"%F %T needle 32k c128 rest done rc $?" >> runs/r22/times.log
echo done > runs/r22/chain3.done
# then what 128 candidates cost: forward time at 32k beside 32 candidates, the window alone and SDPA (one process)
date -u +"%F %T cost start" >> runs/r22/times.log
.venv/bin/python benchmarks/candidates_cost.py --lengths 8k,16k,32k --candidates 0,32,64,128 --repeats 2 --threads 2 --plot runs/r22/candidates_cost.png \
  --out runs/r22/candidates_cost.json > runs/r22/candidates_cost.log 2>&1
date -u +"%F %T cost done rc $?" >> runs/r22/times.log
echo done > runs/r22/chain4.done
