#!/bin/bash
# Round 17: len-2k-ga4-mix (the 2k control with len-8k's data mix), trained and evaluated like the other two.
cd /work/main
R=runs/r17; name=len-2k-ga4-mix; B=runs/study-length/train/$name
[ -f $B/adapter/adapter_config.json ] || .venv/bin/ctxext finetune --recipe recipes/study-length/$name.yaml --merge > $R/train-$name.log 2>&1
.venv/bin/python benchmarks/quality_study.py --recall-one $B/adapter --recall-out $R/recall-$name.json --recall-set rope=axis \
  > $R/recall-$name.log 2>&1
.venv/bin/python benchmarks/checkpoint_curve.py $B --every 15 --no-step0 --threads 2 --set rope=axis \
  --out $R/curve-$name.json > $R/curve-$name.log 2>&1
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
.venv/bin/ctxext eval $B/adapter --set rope=axis --tasks ppl --lengths 2k,8k,16k --data "$DATA" --docs 1 \
  --out $R/eval-ppl-$name > $R/eval-ppl-$name.log 2>&1
echo done > $R/mix.done
