#!/bin/bash
# Round 17, after chain.sh: the study's 126-record recall (8 held-out blocks of 2k, records farther than the
# window of 256) with rope=axis, the protocol the 16k GPU model was scored by (96.8%).
cd /work/main
R=runs/r17
while [ ! -f $R/chain.done ]; do sleep 20; done
for name in len-8k len-2k-ga4; do
  .venv/bin/python benchmarks/quality_study.py --recall-one runs/study-length/train/$name/adapter \
    --recall-out $R/recall-$name.json --recall-set rope=axis > $R/recall-$name.log 2>&1
done
echo done > $R/recall.done
