"""The Python binding's overhead (issue 23's goal: at most 1.2x the library's time):
scoring N pairs of an MF run from numpy through `collm.Recommender.score`, against the same
call inside the library (`_bench_library_seconds`: rows built and scored in Rust), same run,
same pairs, interleaved, best of R each.

    python3 crates/collm-py/bench/overhead.py [N] [R]
"""

import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import collm

n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 7
root = Path(tempfile.mkdtemp(prefix="collm-bench-"))
collm.prepare("synthetic", root / "data", users=2000, items=448, rows_per_user=20, title_words=8, seed=1)
collm.train_cf(root / "data", root / "mf", model="mf", dim=64, max_epochs=1)
rec = collm.Recommender(root / "mf", root / "data")
rng = np.random.default_rng(0)
users = rng.integers(1, rec.max_user + 1, n)
items = rng.integers(1, rec.max_item + 1, n)
rec.score(users, items)  # warm up
py, lib = [], []
for _ in range(reps):
    t = time.perf_counter()
    rec.score(users, items)
    py.append(time.perf_counter() - t)
    lib.append(rec._bench_library_seconds(users, items))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"cpu: {cpu}")
print(f"pairs: {n}, best of {reps}")
print(f"library: {min(lib) * 1e3:.1f} ms   python: {min(py) * 1e3:.1f} ms   ratio: {min(py) / min(lib):.3f}")
