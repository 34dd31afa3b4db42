#!/bin/bash
# Round 27, after chain3.sh. (1) The two 32k needles with every head reading the needle's far block from the
# question's first token on (--read-needle question): the question's own tokens read it too. (2) The same
# needles (and their 8k / 16k cuts) under full attention, as controls for the first answer token: SmolLM2
# itself (SDPA; the cuts to 8k lie inside its native context) and full attention with yarn x4 fine-tuned
# the same way at 2k (round 4's `full-yarn`).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r27
while [ ! -f runs/r27/chain3.done ]; do sleep 30; done
B=runs/study/train/retrieve-b64-c32
log() { date -u +"%F %T $*" >> runs/r27/times.log; }
log "needle_choice 32k share 0.5 read-needle question depth 0.9 start"
.venv/bin/python benchmarks/needle_choice.py $B/adapter --set rope=axis --set retrieve_candidate_share=0.5 --lengths 32k \
  --depths 0.9 --seeds 0,1 --read-needle question --threads 2 --out runs/r27/nc-32k-share0.5-readq-d0.9.json \
  > runs/r27/nc-32k-share0.5-readq-d0.9.log 2>&1
log "needle_choice 32k share 0.5 read-needle question depth 0.9 done rc $?"
for m in smollm2; do  # full-yarn: not run this round (this chain was stopped after smollm2 for chain5.sh; no time left)
  name=$(basename $(dirname $m))-$(basename $m); [ $m = smollm2 ] && name=smollm2
  log "needle_choice $name 32k shorten 8k,16k depth 0.9 start"
  .venv/bin/python benchmarks/needle_choice.py $m --lengths 32k --depths 0.9 --seeds 0,1 --shorten 8k,16k --threads 2 \
    --out runs/r27/nc-$name-shorten-d0.9.json > runs/r27/nc-$name-shorten-d0.9.log 2>&1
  log "needle_choice $name 32k shorten 8k,16k depth 0.9 done rc $?"
done
echo done > runs/r27/chain4.done
