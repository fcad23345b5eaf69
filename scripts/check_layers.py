#!/usr/bin/env python3
"""The house's layering, checked (issue 33; run by .ci/run):

1. No import circle between the modules of a crate: a module's file (or folder) names
   `crate::OTHER` (in a `use` or a path) only where OTHER does not name it back, directly or
   through others. Submodules of one folder count as their top-level module; `#[cfg(test)]`
   blocks and doc comments are ignored.
2. The ground floor stays low: collm-core depends on no collm crate; collm-llm, collm-nn and
   collm-report do not depend on collm-data; nothing below `collm` depends on it.

Prints each circle or layering fault and exits 1 when there is one.
"""
import pathlib
import re
import sys

try:
    import tomllib  # Python 3.11+
except ImportError:  # older Pythons: the [dependencies] names are all this script reads
    tomllib = None

root = pathlib.Path(__file__).resolve().parent.parent
faults = []


def strip(text):
    # Drop `#[cfg(test)] mod tests { ... }` (to the end of the file, where tests live here),
    # line comments and doc comments.
    text = re.split(r"#\[cfg\(test\)\]\s*mod \w+", text)[0]
    return "\n".join(l.split("//")[0] for l in text.splitlines())


for crate in sorted((root / "crates").iterdir()):
    src = crate / "src"
    if not src.is_dir():
        continue
    graph = {}
    for f in src.rglob("*.rs"):
        rel = f.relative_to(src).with_suffix("")
        top = rel.parts[0]
        if top in ("lib", "main"):
            continue
        refs = set(re.findall(r"\bcrate::(\w+)", strip(f.read_text())))
        # `use crate::{a, b::c}` groups.
        for group in re.findall(r"\bcrate::\{([^}]*)\}", strip(f.read_text())):
            refs |= {p.strip().split("::")[0] for p in group.split(",") if p.strip()}
        graph.setdefault(top, set()).update(r for r in refs if r != top)
    # Strongly connected components (Tarjan).
    index, low, stack, on, sccs, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    for comp in sccs:
        edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp]
        faults.append(f"{crate.name}: import circle between {', '.join(comp)} ({'; '.join(edges)})")

deps = {}
for crate in sorted((root / "crates").iterdir()):
    manifest = crate / "Cargo.toml"
    if not manifest.is_file():
        continue
    text = manifest.read_text()
    if tomllib is not None:
        m = tomllib.loads(text)
        name, names = m["package"]["name"], set(m.get("dependencies", {}))
    else:
        name = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M).group(1)
        section = re.search(r"^\[dependencies\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
        body = section.group(1) if section else ""
        names = set(re.findall(r"^([A-Za-z0-9_-]+)(?:\.workspace)?\s*=", body, re.M))
    deps[name] = {d for d in names if d.startswith("collm")}
rules = [
    ("collm-core", None),
    ("collm-llm", "collm-data"),
    ("collm-nn", "collm-data"),
    ("collm-report", "collm-data"),
]
for crate, banned in rules:
    got = deps.get(crate, set())
    bad = got if banned is None else got & {banned}
    if bad:
        faults.append(f"{crate} depends on {', '.join(sorted(bad))}")
for crate in ("collm-core", "collm-data", "collm-nn", "collm-llm", "collm-cf", "collm-metrics", "collm-report"):
    if "collm" in deps.get(crate, set()):
        faults.append(f"{crate} depends on collm (the crate above it)")

for f in faults:
    print(f"check_layers: {f}")
if faults:
    sys.exit(1)
print(f"check_layers: no import circle in {len(deps)} crates; the ground floor stays low")
