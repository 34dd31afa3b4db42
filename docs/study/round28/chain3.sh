#!/bin/bash
# Round 28, beside chain2.sh's needles: retrieve_bias 1 lowered perplexity at 2k and 8k (8.08 / 7.23 against 8.21 / 7.44),
# so a short sweep (0.5, 2) at 2k / 8k, then bias 1 at 32k (bias 0: 7.66 in round 21, same document and command).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r28
B=runs/study/train/retrieve-b64-c32
log() { date -u +"%F %T $*" >> runs/r28/times.log; }
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
for b in 0.5 2; do
  log "ppl 2k,8k bias $b start"
  .venv/bin/ctxext eval $B/adapter --set rope=axis --set retrieve_bias=$b --tasks ppl --lengths 2k,8k --data "$DATA" \
    --docs 1 --out runs/r28/eval-ppl-bias$b --force > runs/r28/eval-ppl-bias$b.log 2>&1
  log "ppl 2k,8k bias $b done rc $?"
done
log "ppl 32k bias 1 start"
.venv/bin/ctxext eval $B/adapter --set rope=axis --set retrieve_bias=1 --tasks ppl --lengths 32k --data "$DATA" \
  --docs 1 --out runs/r28/eval-ppl-32k-bias1 --force > runs/r28/eval-ppl-32k-bias1.log 2>&1
log "ppl 32k bias 1 done rc $?"
echo done > runs/r28/chain3.done
