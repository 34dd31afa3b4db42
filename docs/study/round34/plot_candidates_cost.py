"""Round 34's figure: the attention call's time against length, 8k-32k from round 23's run and 64k-128k from
this round's, for SDPA, the shipped 32 candidates and a quarter share (the columns both runs have).

    python docs/study/round34/plot_candidates_cost.py   # writes docs/study/round34/candidates_cost.png
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))

from candidates_cost import plot  # noqa: E402

runs = [json.loads((ROOT / f"docs/study/round{r}/candidates_cost.json").read_text()) for r in (23, 34)]
rows = sorted((row for run in runs for row in run["rows"]), key=lambda row: row["n"])
plot(rows, [32], ROOT / "docs/study/round34/candidates_cost.png", shares=[0.25])
