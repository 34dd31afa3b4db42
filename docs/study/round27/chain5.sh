#!/bin/bash
# Round 27, after chain4.sh's SmolLM2 run: the two 32k needles, half the far blocks as candidates, with the choice from the
# question's first token on made among the far blocks of the 8k cut alone (--choose-recent 8k; every
# earlier token chooses from the whole haystack). Does the first token come back to the 8k cut's level?
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r27
while [ ! -f runs/r27/nc-smollm2-shorten-d0.9.json ]; do sleep 30; done
B=runs/study/train/retrieve-b64-c32
log() { date -u +"%F %T $*" >> runs/r27/times.log; }
log "needle_choice 32k share 0.5 choose-recent 8k depth 0.9 start"
.venv/bin/python benchmarks/needle_choice.py $B/adapter --set rope=axis --set retrieve_candidate_share=0.5 --lengths 32k \
  --depths 0.9 --seeds 0,1 --choose-recent 8k --threads 2 --out runs/r27/nc-32k-share0.5-recent8k-d0.9.json \
  > runs/r27/nc-32k-share0.5-recent8k-d0.9.log 2>&1
log "needle_choice 32k share 0.5 choose-recent 8k depth 0.9 done rc $?"
echo done > runs/r27/chain5.done
