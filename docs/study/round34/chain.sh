#!/bin/bash
# Round 34: the 32k needles with what a user gets: the shipped candidates (32, the default) and the default far
# bias (growth 0.5 nat per doubling past 8,192, capped at 0.5), by generation. Rounds 30-33 ran them with half the
# far blocks as candidates (5 / 6); round 22 ran the shipped candidates teacher-forced at bias 0 (0 / 6).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r34
log() { date -u +"%F %T $*" >> runs/r34/times.log; }
D=runs/study/train/retrieve-b64-c32
for depth in 0.9 0.5 0.1; do
  log "needles 32k depth $depth (2 trials) shipped candidates, growth 0.5 cap 0.5 start"
  .venv/bin/ctxext eval $D/adapter --tasks needle --scoring generate --lengths 32k --depths $depth --trials 2 \
    --set rope=axis --set retrieve_bias_growth=0.5 --set retrieve_bias_cap=0.5 \
    --out runs/r34/needle-c32-cap0.5-d$depth --force > runs/r34/needle-c32-cap0.5-d$depth.log 2>&1
  log "needles 32k depth $depth shipped candidates done rc $?"
done
echo done > runs/r34/chain.done
