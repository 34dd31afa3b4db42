#!/bin/bash
# Round 32, after the fresh-clone CI run: the other 32k needles bias 0 finds (depth 0.5, seeds 0 and 1; depth 0.1,
# seed 0), with the growth capped at 0.5 nat, by generation as in chain4.sh. Depth 0.1 seed 1 is missed by every
# variant so far (rounds 25-30) and was left out for time.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r32
log() { date -u +"%F %T $*" >> runs/r32/times.log; }
D=runs/study/train/retrieve-b64-c32
needles() {  # depth trials
  log "needles 32k depth $1 ($2 trials) growth 0.5 cap 0.5 start"
  .venv/bin/ctxext eval $D/adapter --tasks needle --scoring generate --lengths 32k --depths $1 --trials $2 \
    --set rope=axis --set retrieve_candidate_share=0.5 --set retrieve_bias_growth=0.5 --set retrieve_bias_cap=0.5 \
    --out runs/r32/needle-cap0.5-d$1 --force > runs/r32/needle-cap0.5-d$1.log 2>&1
  log "needles 32k depth $1 growth 0.5 cap 0.5 done rc $?"
}
needles 0.5 2
needles 0.1 1
echo done > runs/r32/chain5.done
