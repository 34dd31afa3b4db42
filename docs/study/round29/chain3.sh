#!/bin/bash
# Round 29, after chain2.sh: the depth-0.1 needles on the model trained with the bias (round 28's one miss at 32k
# was depth 0.1, seed 1), then round 28's missing depth 0.5 on the default model with the zero-shot bias.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r29
while [ ! -f runs/r29/chain2.done ]; do sleep 20; done
log() { date -u +"%F %T $*" >> runs/r29/times.log; }
needles() {  # adapter depth out
  log "needles 32k $1 depth $2 bias 1 start"
  .venv/bin/ctxext eval $1 --tasks needle --scoring generate --lengths 32k --depths $2 --trials 2 \
    --set rope=axis --set retrieve_candidate_share=0.5 --set retrieve_bias=1 --out runs/r29/$3 \
    --force > runs/r29/$3.log 2>&1
  log "needles 32k $1 depth $2 bias 1 done rc $?"
}
needles runs/study/train/retrieve-b64-c32-bias1/adapter 0.1 needle-tb1-d0.1
needles runs/study/train/retrieve-b64-c32/adapter 0.5 needle-default-d0.5-b1
echo done > runs/r29/chain3.done
