#!/bin/bash
# Round 15: retrieve-b64 trained with retrieve_candidates=32, then evaluated like round 13-14.
cd /work/main
B=runs/study/train/retrieve-b64-c32
.venv/bin/ctxext finetune --recipe recipes/study/retrieve-b64-c32.yaml --merge > runs/r15/train.log 2>&1 || { echo fail > runs/r15/chain.done; exit 1; }
P=".venv/bin/python benchmarks/needle_choice.py --set rope=axis --depths 0.1,0.5,0.9 --seeds 0,1 --threads 2"
$P $B/adapter --lengths 8k --out runs/r15/nc-8k-c32train.json > runs/r15/nc-8k.log 2>&1
.venv/bin/python benchmarks/checkpoint_curve.py $B --every 60 --threads 2 --set rope=axis --out runs/r15/curve-axis.json > runs/r15/curve-axis.log 2>&1
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
.venv/bin/ctxext eval $B/adapter --set rope=axis --tasks ppl --lengths 2k,8k --data "$DATA" --docs 1 --out runs/r15/eval-ppl > runs/r15/eval-ppl.log 2>&1
echo done > runs/r15/chain.done
