"""Batch scoring on Ray: a Ray Dataset of ``uid``/``iid`` rows in, the same rows with
``score`` (logit) and ``prob`` out, one :class:`collm.Recommender` per actor.

    import ray, collm.ray
    ray.init(address="auto")                      # an existing cluster; ray.init() for a local one
    ds = ray.data.read_parquet("s3://bucket/pairs/")
    scored = collm.ray.score_dataset(ds, "/shared/runs/collm-mf", concurrency=8, num_cpus=4)
    scored.write_parquet("s3://bucket/scored/")

Every actor opens the run itself, so ``run`` (and ``data``) must be a path each worker node can
read (a shared file system, or the same files on every node). An actor holds the run in memory:
for a CoLLM run the backbone's weights (SmolLM2-135M in f32: about 0.6 GB), the LoRA, the
mapper and the collaborative model, plus the dataset's titles and histories; for a
collaborative-model run its embeddings. Each actor computes with ``num_cpus`` threads.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np

__all__ = ["score_dataset", "Scorer"]


class Scorer:
    """The per-actor scorer ``score_dataset`` maps over batches (usable on its own with
    ``ds.map_batches(Scorer, fn_constructor_args=(run, data, threads), batch_format="numpy")``)."""

    def __init__(self, run: str, data: Optional[str] = None, threads: Optional[int] = None):
        # Before the engine's first parallel call: its thread pool is sized once, lazily.
        if threads is not None and "RAYON_NUM_THREADS" not in os.environ:
            os.environ["RAYON_NUM_THREADS"] = str(max(1, int(threads)))
        from . import Recommender

        self.rec = Recommender(run, data)

    def __call__(self, batch: dict) -> dict:
        s = self.rec.score(batch["uid"], batch["iid"])
        out = dict(batch)
        out["score"] = s
        out["prob"] = 1.0 / (1.0 + np.exp(-s))
        return out


def score_dataset(
    ds: Any,
    run: Union[str, "os.PathLike[str]"],
    data: Union[str, "os.PathLike[str]", None] = None,
    batch_size: int = 4096,
    concurrency: int = 1,
    num_cpus: float = 1,
) -> Any:
    """Scores a Ray Dataset with ``uid``/``iid`` columns through ``concurrency`` actors, each
    holding one Recommender of ``run`` and using ``num_cpus`` CPUs. Returns the lazy Dataset of
    the same rows with ``score`` and ``prob`` (row order within each block kept; sort by a key
    column when you need a global order)."""
    return ds.map_batches(
        Scorer,
        fn_constructor_args=(
            os.fspath(run),
            None if data is None else os.fspath(data),
            max(1, int(num_cpus)),
        ),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=concurrency,
        num_cpus=num_cpus,
    )
