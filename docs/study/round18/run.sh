#!/bin/bash
# Round 18 (issue 8): what the retrieval records buy the default attention at a fixed token count.
# len-2k-ga4-plain (round 17's len-2k-ga4 without records: the same 60 blocks, 15 steps of 4 x 2,048),
# trained and scored as round 17's runs with rope=axis: the study's 126-record recall at 2k, 128 records
# at 8k, the checkpoint curve (held-out loss, 62 records), perplexity at 2k / 8k / 16k. About 50 minutes
# on 2 cores. Usage, from anywhere: bash docs/study/round18/run.sh   (outputs in runs/r18, or R=...)
R=${R:-runs/r18} exec bash "$(dirname "$0")/../round17/run.sh" len-2k-ga4-plain
