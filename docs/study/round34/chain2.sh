#!/bin/bash
# Round 34, after chain.sh: the same six 32k needles by generation with the default far bias and candidates a
# quarter of the far blocks (`retrieve_candidate_share=0.25`, what `ctxext eval` advises past 8 far blocks per
# candidate; 127 candidates at 32k). Half the far blocks found 5 / 6 (rounds 32-33); the shipped 32, chain.sh.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r34
log() { date -u +"%F %T $*" >> runs/r34/times.log; }
while [ ! -f runs/r34/chain.done ]; do sleep 10; done
D=runs/study/train/retrieve-b64-c32
for depth in 0.9 0.5 0.1; do
  log "needles 32k depth $depth (2 trials) share 0.25, growth 0.5 cap 0.5 start"
  .venv/bin/ctxext eval $D/adapter --tasks needle --scoring generate --lengths 32k --depths $depth --trials 2 \
    --set rope=axis --set retrieve_candidate_share=0.25 --set retrieve_bias_growth=0.5 --set retrieve_bias_cap=0.5 \
    --out runs/r34/needle-s0.25-cap0.5-d$depth --force > runs/r34/needle-s0.25-cap0.5-d$depth.log 2>&1
  log "needles 32k depth $depth share 0.25 done rc $?"
done
echo done > runs/r34/chain2.done
