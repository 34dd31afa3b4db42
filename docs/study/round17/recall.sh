#!/bin/bash
# Round 17, after chain.sh: the study's 126-record recall (8 held-out blocks of 2k, records farther than the
# window of 256) with rope=axis, the protocol the 16k GPU model was scored by (96.8%); then the same records'
# protocol at 8k (2 blocks of 8,192 tokens with 64 records each: distances up to 8k, the length len-8k trained at).
cd /work/main
R=runs/r17
while [ ! -f $R/chain.done ]; do sleep 20; done
Q=".venv/bin/python benchmarks/quality_study.py"
for name in len-8k len-2k-ga4; do
  $Q --recall-one runs/study-length/train/$name/adapter --recall-out $R/recall-$name.json --recall-set rope=axis \
    > $R/recall-$name.log 2>&1
done
for name in len-8k len-2k-ga4; do
  $Q --recall-one runs/study-length/train/$name/adapter --recall-out $R/recall8k-$name.json --recall-set rope=axis \
    --recall-blocks 2 --recall-length 8192 --recall-records 64 > $R/recall8k-$name.log 2>&1
done
echo done > $R/recall.done
