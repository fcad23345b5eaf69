"""What the tests share: the tiny run family (built once per session) and the `collm` binary
whose outputs the Python API must equal."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import collm.testing

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    return collm.testing.tiny_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def collm_bin():
    """The binary built from the same tree (scripts/test.sh builds it first)."""
    b = os.environ.get("COLLM_BIN") or str(ROOT / "target" / "release" / "collm")
    if not Path(b).is_file():
        b = shutil.which("collm")
    if not b:
        pytest.skip("no collm binary: run `cargo build --release --bins` (scripts/test.sh does)")
    return b


def run_bin(binary, *args):
    out = subprocess.run(
        [binary, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLLM_LOG": "error"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout
