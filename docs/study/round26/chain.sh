#!/bin/bash
# Round 26 (CPU): the default recipe trained with its recalls interleaved in the text
# (`recipes/study/retrieve-b64-c32-interleaved.yaml`), then (1) the 32k needles scored by generation with
# half the far blocks as candidates, as round 25 scored the default model (3 / 6), (2) held-out loss and
# recall at step 60 (round 15's protocol), (3) perplexity at 2k / 8k, (4) the 8k needles teacher-forced.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r26
B=runs/study/train/retrieve-b64-c32-interleaved
log() { date -u +"%F %T $*" >> runs/r26/times.log; }
while [ ! -f $B/adapter/adapter_config.json ]; do sleep 30; done
log "needle 32k generate share 0.5 start"
.venv/bin/ctxext eval $B/adapter --tasks needle --scoring generate --lengths 32k --depths 0.1,0.5,0.9 --trials 2 \
  --set rope=axis --set retrieve_candidate_share=0.5 --out runs/r26/eval-needle-32k-share0.5 --force \
  > runs/r26/eval-needle-32k-share0.5.log 2>&1
log "needle 32k done rc $?"
.venv/bin/python benchmarks/checkpoint_curve.py $B --every 60 --no-step0 --threads 2 --set rope=axis \
  --out runs/r26/curve-axis.json > runs/r26/curve-axis.log 2>&1
log "curve done rc $?"
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
.venv/bin/ctxext eval $B/adapter --set rope=axis --tasks ppl --lengths 2k,8k --data "$DATA" --docs 1 \
  --out runs/r26/eval-ppl --force > runs/r26/eval-ppl.log 2>&1
log "ppl done rc $?"
.venv/bin/python benchmarks/needle_choice.py $B/adapter --set rope=axis --depths 0.1,0.5,0.9 --seeds 0,1 --threads 2 \
  --lengths 8k --out runs/r26/nc-8k.json > runs/r26/nc-8k.log 2>&1
log "nc 8k done rc $?"
echo done > runs/r26/chain.done
