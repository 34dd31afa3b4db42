#!/bin/bash
# Round 32, after probe A (chain2.sh) found the 128k passkey at depth 0.1 with the growth capped at 0.5 nat: what that
# cap does to perplexity at 32k / 64k (up to 16k it is the uncapped growth: 7.44 / 7.16 at 8k / 16k), then probe B
# of chain2.sh (the haystack at bias 0), started here instead of there.
# Ran the perplexity pass; probe B was dropped for the 32k needles with the cap (chain4.sh): no time for both.
cd "$(git rev-parse --show-toplevel)" && mkdir -p runs/r32
log() { date -u +"%F %T $*" >> runs/r32/times.log; }
while pgrep -f "benchmarks/far_share.py" > /dev/null; do sleep 10; done
log "far_share passkey 128k d0.1 cap 0.5 done (chain2's probe A)"
D=runs/study/train/retrieve-b64-c32
DATA=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import quality_study as q; print(q.held_out_data())")
log "ppl 32k,64k growth 0.5 cap 0.5 start"
.venv/bin/ctxext eval $D/adapter --set rope=axis --set retrieve_bias_growth=0.5 --set retrieve_bias_cap=0.5 --tasks ppl \
  --lengths 32k,64k --data "$DATA" --docs 1 --out runs/r32/eval-ppl-cap0.5 --force > runs/r32/eval-ppl-cap0.5.log 2>&1
log "ppl 32k,64k growth 0.5 cap 0.5 done rc $?"
log "far_share passkey 128k d0.1, haystack bias 0, question 0.25,0.5,1,2 start"
.venv/bin/python benchmarks/far_share.py $D/adapter --set rope=axis --task passkey --lengths 128k --depths 0.1 --seeds 0 \
  --threads 2 --bias 0.25,0.5,1,2 --out runs/r32/fs-passkey-b0.json --plot runs/r32/fs-passkey-b0.png \
  > runs/r32/fs-passkey-b0.log 2>&1
log "far_share passkey 128k d0.1 bias 0 done rc $?"
echo done > runs/r32/chain3.done
