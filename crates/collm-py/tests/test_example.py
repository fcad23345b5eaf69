"""examples/python/quickstart.py runs as documented and writes its chart."""

import subprocess
import sys

from conftest import ROOT


def test_quickstart_example_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python" / "quickstart.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "CoLLM-MF test AUC" in out.stdout
    png = tmp_path / "warm_cold.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
