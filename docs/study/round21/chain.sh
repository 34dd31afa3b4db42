#!/bin/bash
# Round 21: retrain the CPU default model (round 15's recipe), then run it past 16k: ppl at 32k / 64k, passkey at 32k / 64k.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r21
B=runs/study/train/retrieve-b64-c32
date -u +"%F %T train start" >> runs/r21/times.log
.venv/bin/ctxext finetune --recipe recipes/study/retrieve-b64-c32.yaml > runs/r21/train.log 2>&1 || { echo fail > runs/r21/chain.done; exit 1; }
date -u +"%F %T train done" >> runs/r21/times.log
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
.venv/bin/ctxext eval $B/adapter --set rope=axis --tasks ppl --lengths 32k,64k --data "$DATA" --docs 1 --out runs/r21/eval-ppl --force > runs/r21/eval-ppl.log 2>&1
date -u +"%F %T ppl done" >> runs/r21/times.log
.venv/bin/ctxext eval $B/adapter --set rope=axis --tasks passkey --lengths 32k,64k --depths 0.1,0.5,0.9 --trials 1 --out runs/r21/eval-passkey --force > runs/r21/eval-passkey.log 2>&1
date -u +"%F %T passkey done" >> runs/r21/times.log
echo done > runs/r21/chain.done
