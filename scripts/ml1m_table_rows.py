#!/usr/bin/env python3
"""README's ML-1M table rows from finished rows (called by scripts/ml1m_table.sh --table).

Usage: ml1m_table_rows.py RUN_DIR CONFIG KIND ...  (triples, one per finished row)
       ml1m_table_rows.py --compare ROW BASE JSON ...  (--compare: `collm eval compare --json`
       of ROW's valid scores against BASE's, a markdown table of the paired differences)
Each row: valid AUC / UAUC, warm / cold AUC (eval-valid.json), the budget spent (metrics.json
and the config), the wall time (driver.log's "trained N s" lines, summed over sessions) and the
machines it ran on (for LLM rows with the kernel of their frozen projections)."""
import json
import os
import re
import sys


def fmt(x):
    return "-" if x is None else "%.4f" % x


def row(d, cfg, kind):
    r = json.load(open(os.path.join(d, "eval-valid.json")))
    sub = r.get("subsets", {})
    text = open(cfg).read()

    def get(k):
        m = re.search(r"^%s\s*=\s*([^\s#]+)" % k, text, re.M)
        return m.group(1).strip('"') if m else "?"

    m = json.load(open(os.path.join(d, "metrics.json")))
    if kind in ("cf", "ctrl"):
        budget = "best epoch %s of %s (patience %s)" % (
            m.get("best_epoch"), len(m.get("curve", [])), get("patience"))
    elif get("mode") == "icl":
        budget = "no training"
    else:
        # An early stop and a best step before the last are part of what the row cost.
        stop = " (patience)" if m.get("stopped") == "patience" else ""
        best = m.get("best_step")
        best = " (best: step %s)" % best if best not in (None, m.get("step")) else ""
        budget = "%s of %s steps%s, batch %s%s" % (
            m.get("step"), get("max_steps"), stop, get("batch_size"), best)
    p = os.path.join(d, "driver.log")
    log = open(p).read() if os.path.exists(p) else ""
    secs = sum(int(x) for x in re.findall(r"trained (\d+) s", log))
    machines = sorted(set(re.findall(r" on (.*?), \d+ cores", log)))
    # LLM rows: the kernel the frozen projections ran with (logged since the bf16 kernels; f32
    # before them).
    kernels = sorted(set(re.findall(r", kernel ([a-z0-9]+)", log)))
    if kind == "llm" and get("mode") != "icl" or kind == "ctrl":
        machines = ["%s; kernel %s" % ("; ".join(machines) or "?", ", ".join(kernels) or "f32")]
    wall = "%.1f h" % (secs / 3600) if secs >= 360 else "%d s" % secs
    return "| %s | %s | %s | %s | %s | %s | %s | %s |" % (
        os.path.basename(d), fmt(r["auc"]), fmt(r["uauc"]), fmt(sub.get("warm", {}).get("auc")),
        fmt(sub.get("cold", {}).get("auc")), budget, wall, "; ".join(machines) or "?")


def compare(row, base, path):
    """One row of the comparison table from `collm eval compare --json`."""
    c = json.load(open(path))
    d = {(x["rows"], x["metric"]): x for x in c["differences"]}

    def cell(rows, metric):
        x = d[(rows, metric)]
        if x["diff"] is None or x["ci_low"] is None:
            return "-", "-"
        p = x["p_not_above"]
        p = "<%.4f" % (1 / x["resamples_defined"]) if p == 0 else "%.4f" % p
        return "%+.4f [%+.4f, %+.4f]" % (x["diff"], x["ci_low"], x["ci_high"]), p

    cells = [v for k in (("all", "auc"), ("all", "uauc"), ("cold", "auc")) for v in cell(*k)]
    return "| %s | %s | %s |" % (row, base, " | ".join(cells))


args = sys.argv[1:]
if args[:1] == ["--compare"]:
    # Triples ROW BASE JSON: ROW's scores against BASE's (collm eval compare --json).
    args = args[1:]
    print("| row | against | AUC A−B [95%] | P(A≤B) | UAUC A−B [95%] | P(A≤B) | cold AUC A−B [95%] | P(A≤B) |")
    print("|---|---|---|---|---|---|---|---|")
    for k in range(0, len(args), 3):
        print(compare(*args[k:k + 3]))
else:
    for k in range(0, len(args), 3):
        print(row(*args[k:k + 3]))
