#!/bin/bash
# Round 22, after chain.sh: (1) the needles the default missed at 32k, chosen with 4x the candidates (128: the bound
# proposes 128 far blocks of 512, the exact max q.k picks 8); (2) the fine-tuned yarn x4 baseline (round 4's recipe,
# T = 2k) retrained, then its perplexity on the document of round 21's 32k / 64k perplexity (pydoc_data/topics.py).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r22
while [ ! -f runs/r22/chain.done ]; do sleep 30; done
B=runs/study/train/retrieve-b64-c32
date -u +"%F %T needle 32k c128 start" >> runs/r22/times.log
.venv/bin/python benchmarks/needle_choice.py $B/adapter --set rope=axis --set retrieve_candidates=128 --lengths 32k --depths 0.1,0.5 --seeds 0 \
  --threads 2 --out runs/r22/nc-32k-c128.json > runs/r22/nc-32k-c128.log 2>&1
date -u +"%F %T needle 32k c128 done rc $?" >> runs/r22/times.log
Y=runs/study/train/full-yarn
date -u +"%F %T yarn train start" >> runs/r22/times.log
.venv/bin/ctxext finetune --recipe recipes/study/full-yarn.yaml > runs/r22/train-yarn.log 2>&1 || { echo fail > runs/r22/chain2.done; exit 1; }
date -u +"%F %T yarn train done" >> runs/r22/times.log
T=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'] + '/pydoc_data/topics.py')")
.venv/bin/ctxext eval $Y/adapter --tasks ppl --lengths 32k     --data "$T" --docs 1 --out runs/r22/eval-yarn-ppl --force > runs/r22/eval-yarn-ppl.log 2>&1
date -u +"%F %T yarn ppl done rc $?" >> runs/r22/times.log
echo done > runs/r22/chain2.done
