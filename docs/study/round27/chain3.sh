#!/bin/bash
# Round 27, after chain2.sh's read-needle pair (its retrieve-16 run was dropped for this): the two depth-0.9
# needles with half the far blocks as candidates, the model's own choice, each scored at 32k and again with
# its haystack cut from the front to 8k and 16k (the instruction, the needle, the question and the 3.3k
# tokens between them unchanged): does the first answer token depend on the length, with the same local text?
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r27
while [ ! -f runs/r27/nc-32k-share0.5-read-d0.9.json ]; do sleep 30; done
B=runs/study/train/retrieve-b64-c32
log() { date -u +"%F %T $*" >> runs/r27/times.log; }
log "needle_choice 32k share 0.5 shorten 8k,16k depth 0.9 start"
.venv/bin/python benchmarks/needle_choice.py $B/adapter --set rope=axis --set retrieve_candidate_share=0.5 --lengths 32k \
  --depths 0.9 --seeds 0,1 --shorten 8k,16k --threads 2 --out runs/r27/nc-32k-share0.5-shorten-d0.9.json \
  > runs/r27/nc-32k-share0.5-shorten-d0.9.log 2>&1
log "needle_choice 32k share 0.5 shorten 8k,16k depth 0.9 done rc $?"
echo done > runs/r27/chain3.done
