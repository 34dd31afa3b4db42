#!/bin/bash
# Round 22, after chain3.sh: the fine-tuned yarn x4 baseline at 64k on the same document (2x past its scaled 32k).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r22
while [ ! -f runs/r22/chain4.done ]; do sleep 30; done
T=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'] + '/pydoc_data/topics.py')")
date -u +"%F %T yarn ppl 64k start" >> runs/r22/times.log
.venv/bin/ctxext eval runs/study/train/full-yarn/adapter --tasks ppl --lengths 64k --data "$T" --docs 1 --out runs/r22/eval-yarn-ppl-64k --force > runs/r22/eval-yarn-ppl-64k.log 2>&1
date -u +"%F %T yarn ppl 64k done rc $?" >> runs/r22/times.log
echo done > runs/r22/chain5.done
