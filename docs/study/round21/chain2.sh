#!/bin/bash
# After chain.sh: the 64k document (pydoc_data/topics.py, the only held-out one that long) over its first 32k tokens too.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r21
while [ ! -f runs/r21/chain.done ]; do sleep 30; done
B=runs/study/train/retrieve-b64-c32
T=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'] + '/pydoc_data/topics.py')")
.venv/bin/ctxext eval $B/adapter --set rope=axis --tasks ppl --lengths 32k --data "$T" --docs 1 --out runs/r21/eval-ppl-topics --force > runs/r21/eval-ppl-topics.log 2>&1
date -u +"%F %T topics done" >> runs/r21/times.log
echo done > runs/r21/chain2.done
