#!/bin/bash
# Round 29: the default recipe trained with retrieve_bias 1 (recipes/study/retrieve-b64-c32-bias1.yaml), then the
# measurements round 28 made zero-shot: perplexity at 2k / 8k (with the bias it was trained with, and without),
# the 32k needles by generation at depth 0.9 and 0.1; between them, round 28's missing depth 0.5 on the default
# model with the zero-shot bias; last, perplexity at 32k.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r29
log() { date -u +"%F %T $*" >> runs/r29/times.log; }
D=runs/study/train/retrieve-b64-c32
B=runs/study/train/retrieve-b64-c32-bias1
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
log "train bias1 start"
.venv/bin/ctxext finetune --recipe recipes/study/retrieve-b64-c32-bias1.yaml > runs/r29/train.log 2>&1
log "train bias1 done rc $?"
for b in 1 0; do
  log "ppl 2k,8k trained-bias1 eval-bias $b start"
  .venv/bin/ctxext eval $B/adapter --set rope=axis --set retrieve_bias=$b --tasks ppl --lengths 2k,8k --data "$DATA" \
    --docs 1 --out runs/r29/eval-ppl-tb1-b$b --force > runs/r29/eval-ppl-tb1-b$b.log 2>&1
  log "ppl 2k,8k trained-bias1 eval-bias $b done rc $?"
done
needles() {  # adapter depths out bias
  log "needles 32k $1 depths $2 bias $4 start"
  .venv/bin/ctxext eval $1 --tasks needle --scoring generate --lengths 32k --depths $2 --trials 2 \
    --set rope=axis --set retrieve_candidate_share=0.5 --set retrieve_bias=$4 --out runs/r29/$3 \
    --force > runs/r29/$3.log 2>&1
  log "needles 32k $1 depths $2 bias $4 done rc $?"
}
needles $B/adapter 0.9 needle-tb1-d0.9 1
needles $D/adapter 0.5 needle-default-d0.5-b1 1
needles $B/adapter 0.1 needle-tb1-d0.1 1
log "ppl 32k trained-bias1 start"
.venv/bin/ctxext eval $B/adapter --set rope=axis --set retrieve_bias=1 --tasks ppl --lengths 32k --data "$DATA" \
  --docs 1 --out runs/r29/eval-ppl-32k-tb1 --force > runs/r29/eval-ppl-32k-tb1.log 2>&1
log "ppl 32k trained-bias1 done rc $?"
echo done > runs/r29/chain.done
