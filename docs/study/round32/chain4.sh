#!/bin/bash
# Round 32, after the perplexity pass of chain3.sh: the two 32k needles bias 0 misses (depth 0.9, seeds 0 and 1;
# found by a fixed 1 nat and by the uncapped growth, round 30) with the growth capped at 0.5 nat, which keeps the
# 128k passkey (chain2.sh). Round 30's command: by generation, half the far blocks as candidates.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r32
log() { date -u +"%F %T $*" >> runs/r32/times.log; }
while pgrep -f "eval-ppl-cap0.5" > /dev/null; do sleep 10; done
log "ppl 32k,64k growth 0.5 cap 0.5 done (chain3's pass)"
D=runs/study/train/retrieve-b64-c32
log "needles 32k depth 0.9 growth 0.5 cap 0.5 start"
.venv/bin/ctxext eval $D/adapter --tasks needle --scoring generate --lengths 32k --depths 0.9 --trials 2 \
  --set rope=axis --set retrieve_candidate_share=0.5 --set retrieve_bias_growth=0.5 --set retrieve_bias_cap=0.5 \
  --out runs/r32/needle-cap0.5-d0.9 --force > runs/r32/needle-cap0.5-d0.9.log 2>&1
log "needles 32k depth 0.9 growth 0.5 cap 0.5 done rc $?"
echo done > runs/r32/chain4.done
