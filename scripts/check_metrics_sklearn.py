#!/usr/bin/env python3
"""Cross-checks `collm eval scores` against scikit-learn on random scores.

AUC must equal sklearn.metrics.roc_auc_score and UAUC the reference's uAUC_me (per-user
roc_auc_score over users with >= 2 rows and both labels, unweighted mean), to 1e-9, overall
and on every warm/cold subset. Scores are drawn with many ties on purpose.

Usage: python3 scripts/check_metrics_sklearn.py [path/to/collm]
"""
import json
import random
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from sklearn.metrics import roc_auc_score

COLLM = sys.argv[1] if len(sys.argv) > 1 else "target/debug/collm"


def read_tsv(path):
    lines = Path(path).read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, l.split("\t"))) for l in lines[1:] if l]


def uauc_me(users, labels, scores):
    groups = defaultdict(list)
    for k, u in enumerate(users):
        groups[u].append(k)
    aucs = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        l = [labels[k] for k in idx]
        if len(set(l)) < 2:
            continue
        aucs.append(roc_auc_score(l, [scores[k] for k in idx]))
    return (sum(aucs) / len(aucs) if aucs else None), len(aucs)


def close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 1e-9


def main():
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([COLLM, "data", "prepare", "synthetic", "--users", "120", "--items", "90",
                        "--seed", "11", "--out", str(data)], check=True)
        train = read_tsv(data / "train.tsv")
        ucount, icount = defaultdict(int), defaultdict(int)
        for r in train:
            ucount[r["uid"]] += 1
            icount[r["iid"]] += 1
        subsets = {
            "warm": lambda u, i: ucount[u] >= 3 and icount[i] >= 3,
            "warm4": lambda u, i: ucount[u] >= 4 and icount[i] >= 4,
            "seen": lambda u, i: ucount[u] >= 1 and icount[i] >= 1,
        }
        for name, f in list(subsets.items()):
            subsets[{"warm": "cold", "warm4": "cold4", "seen": "unseen"}[name]] = (
                lambda f: lambda u, i: not f(u, i))(f)
        rng = random.Random(3)
        for case in range(6):
            split = ["valid", "test"][case % 2]
            rows = read_tsv(data / f"{split}.tsv")
            levels = [3, 20, 10**9][case % 3]
            scores = [rng.randrange(levels) / 7.0 for _ in rows]
            sfile = Path(tmp) / "scores.tsv"
            sfile.write_text("uid\tiid\tscore\n" + "".join(
                f"{r['uid']}\t{r['iid']}\t{s!r}\n" for r, s in zip(rows, scores)))
            out = subprocess.run([COLLM, "eval", "scores", "--data", str(data), "--split", split,
                                  "--scores", str(sfile), "--json"], check=True,
                                 capture_output=True, text=True).stdout
            rep = json.loads(out)
            labels = [int(r["label"]) for r in rows]
            users = [r["uid"] for r in rows]
            want = {"auc": roc_auc_score(labels, scores)}
            want["uauc"], want["uauc_users"] = uauc_me(users, labels, scores)
            checks = [("all", rep, want)]
            for name, f in subsets.items():
                idx = [k for k, r in enumerate(rows) if f(r["uid"], r["iid"])]
                l = [labels[k] for k in idx]
                s = [scores[k] for k in idx]
                w = {"auc": roc_auc_score(l, s) if len(set(l)) == 2 else None}
                w["uauc"], w["uauc_users"] = uauc_me([users[k] for k in idx], l, s)
                w["n"] = len(idx)
                checks.append((name, rep["subsets"][name], w))
            for name, got, w in checks:
                for key, value in w.items():
                    ok = close(got[key], value) if key in ("auc", "uauc") else got[key] == value
                    if not ok:
                        failures += 1
                        print(f"MISMATCH case {case} {split} {name} {key}: collm {got[key]} sklearn {value}")
            print(f"case {case} ({split}, {levels} score levels): auc {rep['auc']:.12f} "
                  f"uauc {rep['uauc']:.12f} users {rep['uauc_users']} - checked {len(checks)} row sets")
    if failures:
        print(f"{failures} mismatches")
        sys.exit(1)
    print("collm eval scores matches scikit-learn to 1e-9")


if __name__ == "__main__":
    main()
