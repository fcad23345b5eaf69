"""collm from Python, end to end on a tiny model (seconds on a laptop):

    python3 examples/python/quickstart.py [OUT_DIR]

trains the quickstart's family (synthetic data, MF, TALLRec, CoLLM-MF) on a tiny random
backbone, scores the test split from a DataFrame, computes AUC/UAUC, ranks items for a user,
and plots warm/cold AUC of the three runs (OUT_DIR/warm_cold.png). For the real model, name
SmolLM2's GGUF as the backbone in the configs (see README) and train with `collm.train`.
"""

import logging
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import collm  # noqa: E402
import collm.testing  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="collm-"))
runs = collm.testing.tiny_family(out, steps=8)

# Score a DataFrame of (uid, iid) pairs and compute the paper's metrics.
test = pd.DataFrame(collm.read_split(runs["data"], "test"))
rec = collm.Recommender(runs["collm"])
scored = rec.score_table(test)
print("CoLLM-MF test AUC", collm.metrics.auc(scored.label, scored.score),
      "UAUC", collm.metrics.uauc(scored.label, scored.score, scored.uid))

# Top items for user 1, with titles.
for r in rec.rank(user=1, k=3):
    print(f"  {r['item']:>3}  {r['score']:+.3f}  {r['title']}")

# Warm/cold AUC of each run (Figure 3 of the paper).
names = {"mf": "MF", "tallrec": "TALLRec", "collm": "CoLLM-MF"}
reports = {}
for key, name in names.items():
    r = collm.Recommender(runs[key], runs["data"] if key == "mf" else None)
    reports[name] = r.evaluate("test")
fig, ax = plt.subplots(figsize=(6, 3.5))
width = 0.25
for k, (name, rep) in enumerate(reports.items()):
    vals = [rep["subsets"][s]["auc"] or 0.0 for s in ("warm", "cold")]
    ax.bar([x + k * width for x in range(2)], vals, width, label=name)
ax.set_xticks([x + width for x in range(2)], ["warm", "cold"])
ax.set_ylabel("test AUC")
ax.legend()
fig.tight_layout()
fig.savefig(out / "warm_cold.png")
print("wrote", out / "warm_cold.png")
