#!/bin/bash
# Round 30: the far bias that grows with the length (new: retrieve_bias_growth, retrieve_bias_from), zero-shot on
# the default model: 0 nats up to 8,192 tokens (SmolLM2's native context), then 0.5 nat per doubling (1 nat at
# 32k, where a fixed 1 nat helped). Perplexity at 8k (must equal the default's 7.44: no query is past the start),
# 16k and 32k; the 16k needles teacher-forced with and without it (the default model's 16k needles were never
# run: round 14's 5 / 6 was the bound-trained model); the 32k needles by generation at depths 0.9 and 0.1 (a fixed
# 1 nat: 2 / 2 and 1 / 2); last, a slower growth (0.25 nat per doubling: round 28's far share rose ~0.25 nat of
# log-odds per doubling) at 16k / 32k.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r30
log() { date -u +"%F %T $*" >> runs/r30/times.log; }
while [ ! -f runs/r30/chain.done ]; do sleep 20; done
D=runs/study/train/retrieve-b64-c32
G="--set retrieve_bias_from=8192 --set retrieve_bias_growth"
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
log "ppl 8k,16k,32k growth 0.5 start"
.venv/bin/ctxext eval $D/adapter --set rope=axis $G=0.5 --tasks ppl --lengths 8k,16k,32k --data "$DATA" \
  --docs 1 --out runs/r30/eval-ppl-g0.5 --force > runs/r30/eval-ppl-g0.5.log 2>&1
log "ppl 8k,16k,32k growth 0.5 done rc $?"
NC=".venv/bin/python benchmarks/needle_choice.py --set rope=axis --depths 0.1,0.5,0.9 --seeds 0,1 --threads 2"
log "needle_choice 16k default growth 0.5 start"
$NC $D/adapter --lengths 16k $G=0.5 --out runs/r30/nc-16k-g0.5.json > runs/r30/nc-16k-g0.5.log 2>&1
log "needle_choice 16k default growth 0.5 done rc $?"
log "needle_choice 16k default bias 0 start"
$NC $D/adapter --lengths 16k --out runs/r30/nc-16k-b0.json > runs/r30/nc-16k-b0.log 2>&1
log "needle_choice 16k default bias 0 done rc $?"
needles() {  # depth, output name
  log "needles 32k default depth $1 growth 0.5 start"
  .venv/bin/ctxext eval $D/adapter --tasks needle --scoring generate --lengths 32k --depths $1 --trials 2 \
    --set rope=axis --set retrieve_candidate_share=0.5 $G=0.5 --out runs/r30/$2 --force > runs/r30/$2.log 2>&1
  log "needles 32k default depth $1 growth 0.5 done rc $?"
}
needles 0.9 needle-g0.5-d0.9
needles 0.1 needle-g0.5-d0.1
log "ppl 16k,32k growth 0.25 start"
.venv/bin/ctxext eval $D/adapter --set rope=axis $G=0.25 --tasks ppl --lengths 16k,32k --data "$DATA" \
  --docs 1 --out runs/r30/eval-ppl-g0.25 --force > runs/r30/eval-ppl-g0.25.log 2>&1
log "ppl 16k,32k growth 0.25 done rc $?"
echo done > runs/r30/chain2.done
