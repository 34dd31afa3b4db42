#!/bin/bash
# Round 23, after chain.sh: (1) what candidate shares cost beside fixed counts (one layer, side by side);
# (2) full attention with yarn x8 fine-tuned like yarn x4 (T = 2k, same tokens), then its perplexity at 2k / 8k
# on the held-out packages and at 32k / 64k on round 21's long document (yarn x4 broke at 64k: 17.81).
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r23
while [ ! -f runs/r23/chain.done ]; do sleep 30; done
date -u +"%F %T cost start" >> runs/r23/times.log
.venv/bin/python benchmarks/candidates_cost.py --lengths 8k,16k,32k --candidates 0,32,128 --shares 0.25,0.5 --repeats 2 \
  --threads 2 --plot runs/r23/candidates_cost.png --out runs/r23/candidates_cost.json > runs/r23/candidates_cost.log 2>&1
date -u +"%F %T cost done rc $?" >> runs/r23/times.log
Y=runs/study/train/full-yarn8
.venv/bin/ctxext finetune --recipe recipes/study/full-yarn8.yaml > runs/r23/train-yarn8.log 2>&1 || { echo fail > runs/r23/chain2.done; exit 1; }
date -u +"%F %T yarn8 train done" >> runs/r23/times.log
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study; print(quality_study.held_out_data())")
T=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'] + '/pydoc_data/topics.py')")
.venv/bin/ctxext eval $Y/adapter --tasks ppl --lengths 2k,8k --data "$DATA" --docs 1 --out runs/r23/eval-yarn8-ppl-2k-8k --force > runs/r23/eval-yarn8-2k-8k.log 2>&1
.venv/bin/ctxext eval $Y/adapter --tasks ppl --lengths 32k --data "$T" --docs 1 --out runs/r23/eval-yarn8-ppl-32k --force > runs/r23/eval-yarn8-32k.log 2>&1
date -u +"%F %T yarn8 ppl 2k-32k done rc $?" >> runs/r23/times.log
.venv/bin/ctxext eval $Y/adapter --tasks ppl --lengths 64k --data "$T" --docs 1 --out runs/r23/eval-yarn8-ppl-64k --force > runs/r23/eval-yarn8-64k.log 2>&1
date -u +"%F %T yarn8 ppl 64k done rc $?" >> runs/r23/times.log
echo done > runs/r23/chain2.done
