#!/usr/bin/env python3
"""README's ML-1M table rows from finished rows (called by scripts/ml1m_table.sh --table).

Usage: ml1m_table_rows.py RUN_DIR CONFIG KIND ...  (triples, one per finished row)
       ml1m_table_rows.py --compare ROW BASE JSON ...  (--compare: `collm eval compare --json`
       of ROW's valid scores against BASE's, a markdown table of the paired differences)
       ml1m_table_rows.py --reproduces OLD NEW KERNEL KIND  (--reproduces: does a row's
       evaluation again, NEW, reproduce its committed eval-valid.json, OLD? See reproduces.)
Each row: valid AUC / UAUC, warm / cold AUC (eval-valid.json), the budget spent (metrics.json
and the config), the wall time (driver.log's "trained N s" lines summed over sessions, or the
trainer's own train_seconds where a session before the driver left no such line) and the
machines it trained and was evaluated on (for LLM rows with the kernel of their frozen
projections; an evaluation again for scores, `--scores`, is in driver.log, not here)."""
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
        budget = "no training (the base model, the ICL template)"
    else:
        # An early stop and a best step before the last are part of what the row cost.
        stop = " (patience)" if m.get("stopped") == "patience" else ""
        best = m.get("best_step")
        best = " (best: step %s)" % best if best not in (None, m.get("step")) else ""
        budget = "%s of %s steps%s, batch %s%s" % (
            m.get("step"), get("max_steps"), stop, get("batch_size"), best)
    p = os.path.join(d, "driver.log")
    log = open(p).read() if os.path.exists(p) else ""
    secs = max(sum(int(x) for x in re.findall(r"trained (\d+) s", log)),
               int(m.get("train_seconds") or 0))
    # Where the row ran: its training sessions and its evaluation, not a later evaluation again
    # for its scores (`--scores`: "evaluated again", "written again").
    ran = "\n".join(l for l in log.splitlines() if " again" not in l)
    machines = sorted(set(re.findall(r" on (.*?), \d+ cores", ran)))
    # LLM rows: the kernel the frozen projections ran with (logged since the bf16 kernels; f32
    # before them).
    kernels = sorted(set(re.findall(r", kernel ([a-z0-9]+)", ran)))
    if kind in ("llm", "ctrl"):
        machines = ["%s; kernel %s" % ("; ".join(machines) or "?", ", ".join(kernels) or "f32")]
    wall = "%.1f h" % (secs / 3600) if secs >= 360 else "%d s" % secs
    if get("mode") == "icl":
        wall += " setup"
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


def reproduces(old_path, new_path, kernel, kind):
    """Does evaluating a row again (report `new_path`) reproduce its committed report
    (`old_path`)? Prints the new AUC and UAUC (and the committed ones where they differ); exit
    status 0 where it does. Exactly (1e-6) for a collaborative row (its evaluation is f32 on any
    CPU and build); within 1e-5 for an LLM row evaluated with the f32 kernel (an older build or
    another CPU sums its f32 products in another order: CoLLM-MF, evaluated on 2026-12-02 on an
    Intel Xeon 6/207, gives AUC 3.5e-7 and UAUC 2.3e-6 off on a Xeon 6/167 today, where a wrong
    weight file moves them by far more); within AUC 1e-3 and UAUC 5e-3 for an LLM row evaluated
    with a bf16 kernel (its roundings move with the build's summation orders)."""
    old, new = (json.load(open(p)) for p in (old_path, new_path))
    llm = kind != "cf"
    bf16 = llm and kernel != "f32"
    da, du = (abs((old[k] or 0) - (new[k] or 0)) for k in ("auc", "uauc"))
    f = lambda x: "-" if x is None else "%.6f" % x
    same = da <= 1e-6 and du <= 1e-6
    if same:
        ok = True
    elif bf16:
        ok = da <= 1e-3 and du <= 5e-3
    else:
        ok = llm and da <= 1e-5 and du <= 1e-5
    ok = ok and (old["uauc"] is None) == (new["uauc"] is None)
    out = "AUC %s, UAUC %s" % (f(new["auc"]), f(new["uauc"]))
    if not same:
        out += " (committed %s, %s%s)" % (f(old["auc"]), f(old["uauc"]),
            ": within %s numerics across builds" % ("bf16" if bf16 else "f32") if ok else "")
    print(out)
    return ok


args = sys.argv[1:]
if args[:1] == ["--reproduces"]:
    sys.exit(0 if reproduces(*args[1:5]) else 1)
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
