#!/bin/bash
# Round 30, after chain3.sh (beside the fresh-clone CI run): the 32k needles at depth 0.5 with the growing bias.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r30
log() { date -u +"%F %T $*" >> runs/r30/times.log; }
while [ ! -f runs/r30/chain3.done ]; do sleep 20; done  # (rerun at 08:36 UTC once the CI check had finished)
D=runs/study/train/retrieve-b64-c32
log "needles 32k default depth 0.5 growth 0.5 start"
.venv/bin/ctxext eval $D/adapter --tasks needle --scoring generate --lengths 32k --depths 0.5 --trials 2 \
  --set rope=axis --set retrieve_candidate_share=0.5 --set retrieve_bias_from=8192 --set retrieve_bias_growth=0.5 \
  --out runs/r30/needle-g0.5-d0.5 --force > runs/r30/needle-g0.5-d0.5.log 2>&1
log "needles 32k default depth 0.5 growth 0.5 done rc $?"
echo done > runs/r30/chain4.done
