#!/bin/bash
# Round 30, after chain2.sh: the fixed 1 nat at 16k (round 28 ran it at 2k / 8k / 32k only), to set beside the
# growing bias there.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r30
log() { date -u +"%F %T $*" >> runs/r30/times.log; }
while [ ! -f runs/r30/chain2.done ]; do sleep 20; done
D=runs/study/train/retrieve-b64-c32
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
log "ppl 16k bias 1 start"
.venv/bin/ctxext eval $D/adapter --set rope=axis --set retrieve_bias=1 --tasks ppl --lengths 16k --data "$DATA" \
  --docs 1 --out runs/r30/eval-ppl-16k-b1 --force > runs/r30/eval-ppl-16k-b1.log 2>&1
log "ppl 16k bias 1 done rc $?"
echo done > runs/r30/chain3.done
