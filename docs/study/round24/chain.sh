#!/bin/bash
# Round 24: the 2k-trained default model at 128k (64 T, 16x SmolLM2's native context): ppl on the first 128k tokens
# of the long held-out document, then the passkey at 128k (depths 0.1 / 0.5 / 0.9, one trial each).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r24
B=runs/study/train/retrieve-b64-c32
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
date -u +"%F %T ppl start" >> runs/r24/times.log
.venv/bin/ctxext eval $B/adapter --set rope=axis --tasks ppl --lengths 128k --data "$DATA" --docs 1 --out runs/r24/eval-ppl-128k --force > runs/r24/eval-ppl-128k.log 2>&1
date -u +"%F %T ppl done" >> runs/r24/times.log
.venv/bin/ctxext eval $B/adapter --set rope=axis --tasks passkey --lengths 128k --depths 0.1,0.5,0.9 --trials 1 --out runs/r24/eval-passkey-128k --force > runs/r24/eval-passkey-128k.log 2>&1
date -u +"%F %T passkey done" >> runs/r24/times.log
echo done > runs/r24/chain.done
