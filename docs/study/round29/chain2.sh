#!/bin/bash
# Round 29, replacing chain.sh after its training step (this CPU ran the training at 35 s a step, not round 28's
# 21, so a 32k needle pass would take longer than planned): perplexity at 2k / 8k with and without the bias, the
# depth-0.9 needles, then perplexity at 32k. What follows is chosen from these (chain3.sh).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r29
log() { date -u +"%F %T $*" >> runs/r29/times.log; }
while pgrep -f "ctxext finetune --recipe recipes/study/retrieve-b64-c32-bias1.yaml" > /dev/null; do sleep 20; done
log "train bias1 done"
B=runs/study/train/retrieve-b64-c32-bias1
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
for b in 1 0; do
  log "ppl 2k,8k trained-bias1 eval-bias $b start"
  .venv/bin/ctxext eval $B/adapter --set rope=axis --set retrieve_bias=$b --tasks ppl --lengths 2k,8k --data "$DATA" \
    --docs 1 --out runs/r29/eval-ppl-tb1-b$b --force > runs/r29/eval-ppl-tb1-b$b.log 2>&1
  log "ppl 2k,8k trained-bias1 eval-bias $b done rc $?"
done
log "needles 32k trained-bias1 depth 0.9 bias 1 start"
.venv/bin/ctxext eval $B/adapter --tasks needle --scoring generate --lengths 32k --depths 0.9 --trials 2 \
  --set rope=axis --set retrieve_candidate_share=0.5 --set retrieve_bias=1 --out runs/r29/needle-tb1-d0.9 \
  --force > runs/r29/needle-tb1-d0.9.log 2>&1
log "needles 32k trained-bias1 depth 0.9 bias 1 done rc $?"
log "ppl 32k trained-bias1 start"
.venv/bin/ctxext eval $B/adapter --set rope=axis --set retrieve_bias=1 --tasks ppl --lengths 32k --data "$DATA" \
  --docs 1 --out runs/r29/eval-ppl-32k-tb1 --force > runs/r29/eval-ppl-32k-tb1.log 2>&1
log "ppl 32k trained-bias1 done rc $?"
echo done > runs/r29/chain2.done
