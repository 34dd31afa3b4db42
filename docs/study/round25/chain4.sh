#!/bin/bash
# Round 25, after chain3.sh: a rope-scaling baseline at 128k. Full attention with yarn x8, fine-tuned like the
# default model (round 23: T = 2k, the same tokens), over the first 131,072 tokens of the long held-out document,
# where the default attention has 7.80 (round 24). 128k is twice yarn x8's scaled range (8 x 8,192).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r25
while [ ! -f runs/r25/chain3.done ]; do sleep 30; done
Y=runs/study/train/full-yarn8
T=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'] + '/pydoc_data/topics.py')")
log() { date -u +"%F %T $*" >> runs/r25/times.log; }
log "yarn8 ppl 128k start"
.venv/bin/ctxext eval $Y/adapter --tasks ppl --lengths 128k --data "$T" --docs 1 --out runs/r25/eval-yarn8-ppl-128k --force \
  > runs/r25/eval-yarn8-ppl-128k.log 2>&1
log "yarn8 ppl 128k done rc $?"
echo done > runs/r25/chain4.done
