#!/bin/bash
# Round 15c: after the 16k/32k perplexity, the needle at 32k (3 depths), then the fresh-clone CI.
cd /work/main
while pgrep -f "eval-ppl-long" > /dev/null; do sleep 15; done
date >> runs/r15/chain2.start
B=runs/study/train/retrieve-b64-c32
.venv/bin/ctxext eval $B/adapter --set rope=axis --tasks needle --lengths 32k --depths 0.1,0.5,0.9 --trials 1 --out runs/r15/eval-needle-32k --force > runs/r15/eval-needle-32k.log 2>&1
date >> runs/r15/chain2.start
echo done > runs/r15/chain3.done
