#!/bin/bash
# Round 28, after chain.sh's depth-0.9 probe: retrieve_bias as the operator option (every token, not only the
# question). Perplexity at 2k / 8k with and without it (the shipped choice), then the six 32k needles scored the way
# a user scores them (round 25: 3 / 6 with half the far blocks as candidates), depth 0.9 first.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r28
while [ ! -f runs/r28/fs-32k-d0.9.json ]; do sleep 30; done
BIAS=${BIAS:-1}
B=runs/study/train/retrieve-b64-c32
log() { date -u +"%F %T $*" >> runs/r28/times.log; }
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
for b in 0 $BIAS; do
  log "ppl 2k,8k bias $b start"
  .venv/bin/ctxext eval $B/adapter --set rope=axis --set retrieve_bias=$b --tasks ppl --lengths 2k,8k --data "$DATA" \
    --docs 1 --out runs/r28/eval-ppl-bias$b --force > runs/r28/eval-ppl-bias$b.log 2>&1
  log "ppl 2k,8k bias $b done rc $?"
done
log "needles 32k generate share 0.5 bias $BIAS start"
.venv/bin/ctxext eval $B/adapter --tasks needle --scoring generate --lengths 32k --depths 0.9,0.1,0.5 --trials 2 \
  --set rope=axis --set retrieve_candidate_share=0.5 --set retrieve_bias=$BIAS --out runs/r28/eval-needle-bias$BIAS \
  --force > runs/r28/eval-needle-bias$BIAS.log 2>&1
log "needles 32k generate share 0.5 bias $BIAS done rc $?"
echo done > runs/r28/chain2.done
