#!/bin/bash
# Round 29, beside chain2/3: does training with 1 nat move the best evaluation bias? 2k / 8k at bias 2 and 0.5.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r29
log() { date -u +"%F %T $*" >> runs/r29/times.log; }
B=runs/study/train/retrieve-b64-c32-bias1
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
for b in 2 0.5; do
  log "ppl 2k,8k trained-bias1 eval-bias $b start"
  .venv/bin/ctxext eval $B/adapter --set rope=axis --set retrieve_bias=$b --tasks ppl --lengths 2k,8k --data "$DATA" \
    --docs 1 --out runs/r29/eval-ppl-tb1-b$b --force > runs/r29/eval-ppl-tb1-b$b.log 2>&1
  log "ppl 2k,8k trained-bias1 eval-bias $b done rc $?"
done
