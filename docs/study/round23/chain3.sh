#!/bin/bash
# Round 23, after chain2.sh: the new option itself at 16k, where the shipped 32 candidates found 5 / 6 needles
# (round 14-15): candidates a quarter of each query's far blocks (about 63 for the answer's tokens at 16k).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r23
while [ ! -f runs/r23/chain2.done ]; do sleep 30; done
B=runs/study/train/retrieve-b64-c32
date -u +"%F %T needle 16k share start" >> runs/r23/times.log
.venv/bin/python benchmarks/needle_choice.py $B/adapter --set rope=axis --set retrieve_candidate_share=0.25 --lengths 16k \
  --depths 0.1,0.5,0.9 --seeds 0,1 --threads 2 --out runs/r23/nc-16k-share.json > runs/r23/nc-16k-share.log 2>&1
date -u +"%F %T needle 16k share done rc $?" >> runs/r23/times.log
echo done > runs/r23/chain3.done
