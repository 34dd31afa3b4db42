#!/bin/bash
# Round 32, after the capped growth (1 nat from 32k on) missed the 128k passkey at depth 0.1 as the uncapped one did
# (` the73366`): the passkey's first answer token against the far bias at the question, from one 128k prefill each
# (benchmarks/far_share.py --task passkey). A: the haystack under a growth capped at 0.5 nat (its own "bias 0"
# variant is exactly that setting, one forward pass), the question lowered 0.25 / 0.5 / 1.5 nat more (0.75 / 1 / 2
# in all); B: the haystack at bias 0 (the default model as shipped), the question lowered 0.25 / 0.5 / 1 / 2 nats.
# Ran A; B was moved behind a perplexity pass (chain3.sh) once A found the passkey with the 0.5 cap.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r32
log() { date -u +"%F %T $*" >> runs/r32/times.log; }
D=runs/study/train/retrieve-b64-c32
P=".venv/bin/python benchmarks/far_share.py $D/adapter --set rope=axis --task passkey --lengths 128k --depths 0.1 --seeds 0 --threads 2"
log "far_share passkey 128k d0.1, haystack growth 0.5 cap 0.5, question +0.25,0.5,1.5 start"
$P --set retrieve_bias_growth=0.5 --set retrieve_bias_cap=0.5 --bias 0.25,0.5,1.5 \
  --out runs/r32/fs-passkey-cap0.5.json --plot runs/r32/fs-passkey-cap0.5.png > runs/r32/fs-passkey-cap0.5.log 2>&1
log "far_share passkey 128k d0.1 cap 0.5 done rc $?"
log "far_share passkey 128k d0.1, haystack bias 0, question 0.25,0.5,1,2 start"
$P --bias 0.25,0.5,1,2 --out runs/r32/fs-passkey-b0.json --plot runs/r32/fs-passkey-b0.png > runs/r32/fs-passkey-b0.log 2>&1
log "far_share passkey 128k d0.1 bias 0 done rc $?"
echo done > runs/r32/chain2.done
