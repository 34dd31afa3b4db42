#!/bin/bash
# Round 17 (issue 8): the training length at a fixed token count, from the repository's root.
#   len-8k          15 steps of one 8,192-token sequence (122,880 tokens)
#   len-2k-ga4      15 steps of 4 x 2,048 (the same tokens, round 15's 60 sequences)
#   len-2k-ga4-mix  the 2k run with len-8k's records (retrieval: 0.21 reads the same 192)
# Each: train (--merge), the study's 126-record recall at 2k, the checkpoint curve (held-out loss and
# round 15's 62 records), perplexity at 2k / 8k / 16k, all scored with rope=axis; len-8k and len-2k-ga4
# also recall 128 records at 8k. About 3 hours on 2 cores. Outputs in runs/r17 (override with R=...).
# Usage: bash docs/study/round17/run.sh [NAME ...]   (default: all three)
set -e
cd "$(dirname "$0")/../../.."
R=${R:-runs/r17}; mkdir -p "$R"
CTXEXT=.venv/bin/ctxext; PY=.venv/bin/python
DATA=$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
NAMES=("$@"); [ ${#NAMES[@]} -gt 0 ] || NAMES=(len-8k len-2k-ga4 len-2k-ga4-mix)
for name in "${NAMES[@]}"; do
  B=runs/study-length/train/$name
  [ -f $B/adapter/adapter_config.json ] ||
    $CTXEXT finetune --recipe recipes/study-length/$name.yaml --merge > "$R/train-$name.log" 2>&1
  $PY benchmarks/quality_study.py --recall-one $B/adapter --recall-out "$R/recall-$name.json" --recall-set rope=axis \
    > "$R/recall-$name.log" 2>&1
  if [ $name != len-2k-ga4-mix ]; then
    $PY benchmarks/quality_study.py --recall-one $B/adapter --recall-out "$R/recall8k-$name.json" --recall-set rope=axis \
      --recall-blocks 2 --recall-length 8192 --recall-records 64 > "$R/recall8k-$name.log" 2>&1
  fi
  $PY benchmarks/checkpoint_curve.py $B --every 15 --no-step0 --threads 2 --set rope=axis \
    --out "$R/curve-$name.json" > "$R/curve-$name.log" 2>&1
  $CTXEXT eval $B/adapter --set rope=axis --tasks ppl --lengths 2k,8k,16k --data "$DATA" --docs 1 \
    --out "$R/eval-ppl-$name" > "$R/eval-ppl-$name.log" 2>&1
done
