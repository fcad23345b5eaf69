"""Tiny runs for tests and examples: a random backbone small enough to train in seconds, and
the family the quickstart trains (synthetic data, MF, TALLRec, CoLLM-MF) built on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from . import _collm, prepare, train, train_cf

__all__ = ["tiny_backbone", "tiny_family"]


def tiny_backbone(dir: Union[str, "os.PathLike[str]"], seed: int = 1) -> Path:
    """Writes a tiny random backbone (config.json, model.safetensors, tokenizer.json) to
    ``dir`` and returns its path: a model directory a config's ``backbone`` can name."""
    _collm._write_tiny_backbone(os.fspath(dir), seed)
    return Path(dir)


def tiny_family(root: Union[str, "os.PathLike[str]"], steps: int = 4) -> dict:
    """Synthetic data, an MF run, a TALLRec run (step 1) and a CoLLM-MF run (step 2) on a
    tiny backbone, under ``root``; returns their paths by name (data, backbone, mf, tallrec,
    collm). Takes seconds."""
    root = Path(root)
    data = root / "data"
    prepare("synthetic", data, users=24, items=30, rows_per_user=6, seed=4)
    mf = root / "mf"
    train_cf(data, mf, model="mf", dim=8, max_epochs=3)
    backbone = tiny_backbone(root / "backbone")
    common = {
        "data": {"path": str(data)},
        "model": {
            "backbone": str(backbone),
            "cf_run": str(mf),
            "step1": str(root / "tallrec"),
            "mapper_mult": 2,
            "eval_batch_size": 4,
        },
        "training": {
            "max_steps": steps,
            "eval_every": steps,
            "eval_rows": 8,
            "batch_size": 4,
            "warmup_steps": 1,
        },
    }
    for mode in ["tallrec", "collm"]:
        train({"mode": mode, "name": mode, **common}, root / mode)
    return {
        "data": data,
        "backbone": backbone,
        "mf": mf,
        "tallrec": root / "tallrec",
        "collm": root / "collm",
    }
