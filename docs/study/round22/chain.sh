#!/bin/bash
# Round 22: the 2k-trained default model's needles in real text at 32k (16 T), token by token, with the choice recorded.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r22
B=runs/study/train/retrieve-b64-c32
date -u +"%F %T needle 32k start" >> runs/r22/times.log
.venv/bin/python benchmarks/needle_choice.py $B/adapter --set rope=axis --lengths 32k --depths 0.1,0.5,0.9 --seeds 0,1 --threads 2 \
  --out runs/r22/nc-32k.json --plot runs/r22/nc-32k.png > runs/r22/nc-32k.log 2>&1
date -u +"%F %T needle 32k done rc $?" >> runs/r22/times.log
echo done > runs/r22/chain.done
