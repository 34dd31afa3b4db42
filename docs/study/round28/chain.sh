#!/bin/bash
# Round 28: after the retrain (round 15's recipe, as round 21), the far share and the far-logit bias at the
# question, from one prefill per needle (benchmarks/far_share.py): first the two depth-0.9 needles that miss at
# 32k with their 8k and 16k cuts, then the other depths at 32k (do the variants keep what passes?).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r28
while ! grep -q "train done" runs/r28/times.log 2>/dev/null; do sleep 30; done
B=runs/study/train/retrieve-b64-c32
log() { date -u +"%F %T $*" >> runs/r28/times.log; }
P=".venv/bin/python benchmarks/far_share.py $B/adapter --set rope=axis --set retrieve_candidate_share=0.5 --threads 2"
log "far_share 32k depth 0.9 shorten 8k,16k start"
$P --lengths 32k --depths 0.9 --seeds 0,1 --shorten 8k,16k --bias 0.5,1,2,3,inf --reads 4,2 \
  --out runs/r28/fs-32k-d0.9.json --plot runs/r28/far_share_d0.9.png > runs/r28/fs-32k-d0.9.log 2>&1
log "far_share 32k depth 0.9 shorten 8k,16k done rc $?"
log "far_share 32k depths 0.1,0.5 start"
$P --lengths 32k --depths 0.1,0.5 --seeds 0,1 --bias 0.5,1,2,3,inf --reads 4,2 \
  --out runs/r28/fs-32k-d0.1-0.5.json --plot runs/r28/far_share_d0.1-0.5.png > runs/r28/fs-32k-d0.1-0.5.log 2>&1
log "far_share 32k depths 0.1,0.5 done rc $?"
echo done > runs/r28/chain.done
