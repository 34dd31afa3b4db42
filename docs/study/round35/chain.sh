#!/bin/bash
# Round 35: the shipped 32 candidates proposed by a tighter bound (the largest bound over sub-blocks of 16 slots,
# `retrieve_score_block=16`, round 12's score, never run with the two-stage choice past 16k) against the 32k
# needles that round 34 found 0 / 6 with the whole-block bound; by generation, the default far bias.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r35
log() { date -u +"%F %T $*" >> runs/r35/times.log; }
D=runs/study/train/retrieve-b64-c32
if [ ! -f $D/adapter/adapter_config.json ]; then
  log "retrain the default model start"
  .venv/bin/ctxext finetune --recipe recipes/study/retrieve-b64-c32.yaml > runs/r35/train.log 2>&1
  log "retrain done rc $?"
fi
for depth in 0.9 0.5 0.1; do
  log "needles 32k depth $depth (2 trials) 32 candidates by sub-blocks of 16, growth 0.5 cap 0.5 start"
  .venv/bin/ctxext eval $D/adapter --tasks needle --scoring generate --lengths 32k --depths $depth --trials 2 \
    --set rope=axis --set retrieve_bias_growth=0.5 --set retrieve_bias_cap=0.5 --set retrieve_score_block=16 \
    --out runs/r35/needle-c32-g16-d$depth --force > runs/r35/needle-c32-g16-d$depth.log 2>&1
  log "needles 32k depth $depth g16 done rc $?"
done
echo done > runs/r35/chain.done
# then, with the CPU otherwise idle: what sub-blocks of 16 add to the attention call past 32k
log "candidates_cost 32k,64k C=32 g=16 start"
.venv/bin/python benchmarks/candidates_cost.py --lengths 32k,64k --candidates 32 --score-blocks 16 --repeats 2 \
  --threads 2 --out docs/study/round35/candidates_cost.json > runs/r35/candidates_cost.log 2>&1
log "candidates_cost done rc $?"
