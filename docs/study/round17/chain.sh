#!/bin/bash
# Round 17: the training length at a fixed token count. len-8k (15 steps of one 8k sequence) against
# len-2k-ga4 (15 steps of four 2k sequences, the same 122,880 tokens), evaluated like round 15
# (held-out loss and recall beyond the window at 2k, perplexity at 2k / 8k / 16k, all with rope=axis).
# Waits for a len-8k training already running (pass its pid as $1), or trains it first.
cd /work/main
R=runs/r17; mkdir -p $R
if [ -n "$1" ]; then while kill -0 "$1" 2>/dev/null; do sleep 20; done
else .venv/bin/ctxext finetune --recipe recipes/study-length/len-8k.yaml --merge > $R/train-8k.log 2>&1; fi
.venv/bin/ctxext finetune --recipe recipes/study-length/len-2k-ga4.yaml --merge > $R/train-2k-ga4.log 2>&1
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
for name in len-8k len-2k-ga4; do
  B=runs/study-length/train/$name
  .venv/bin/python benchmarks/checkpoint_curve.py $B --every 15 --no-step0 --threads 2 --set rope=axis \
    --out $R/curve-$name.json > $R/curve-$name.log 2>&1
  .venv/bin/ctxext eval $B/adapter --set rope=axis --tasks ppl --lengths 2k,8k,16k --data "$DATA" --docs 1 \
    --out $R/eval-ppl-$name > $R/eval-ppl-$name.log 2>&1
done
echo done > $R/chain.done
