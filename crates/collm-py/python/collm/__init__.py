"""collm from Python: CoLLM (Zhang et al., 2023) recommenders, trained and scored by the Rust
engine behind the ``collm`` binary, with the same numbers.

    import collm
    rec = collm.Recommender("runs/collm-mf")           # a run made by `collm train` or collm.train
    df["score"] = rec.score(df.uid, df.iid)             # logits, numpy float64, input order
    collm.metrics.auc(df.label, df.score), collm.metrics.uauc(df.label, df.score, df.uid)

The GIL is released while the engine computes; Ctrl-C stops a long call at its next step
(a training run resumes from its last checkpoint with ``resume=True``); the engine's log
records go to ``logging.getLogger("collm")`` and long calls take ``progress=``, a callable
``progress(task, pos, len, message)``. Errors are ``FileNotFoundError`` (a missing file),
``ValueError`` (input to fix: a file's line, a field, an id) or ``RuntimeError``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from . import _collm
from . import metrics

__version__ = _collm.__version__

PathLike = Union[str, "os.PathLike[str]"]
Progress = Optional[Callable[[str, int, int, Optional[str]], Any]]

__all__ = [
    "Recommender",
    "train",
    "train_cf",
    "prepare",
    "report",
    "read_split",
    "score_parquet",
    "metrics",
    "__version__",
]


def _ids(name: str, x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d sequence of ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(np.mod(a, 1) == 0):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name}: ids are integers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _sigmoid(s: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-s))


class Recommender(_collm.Recommender):
    """A trained run, CoLLM or collaborative model (``run``: its directory). A CoLLM run knows
    its dataset; a collaborative-model run needs ``data`` (the dataset directory it was trained
    on; checked by content)."""

    def score(self, users: Any, items: Any, progress: Progress = None) -> np.ndarray:
        """Logits (P(Yes) = sigmoid) of (user, item) pairs, in input order, as float64. Users
        are scored with their latest history; ids are checked against the run."""
        u, i = _ids("users", users), _ids("items", items)
        return self._score(u, i, progress)

    def probabilities(self, users: Any, items: Any, progress: Progress = None) -> np.ndarray:
        """P(Yes) of (user, item) pairs: ``sigmoid(score(...))``."""
        return _sigmoid(self.score(users, items, progress))

    def score_table(self, table: Any, progress: Progress = None) -> Any:
        """Scores a table with ``uid`` and ``iid`` columns (pandas or polars DataFrame, pyarrow
        Table) and returns the same kind of table with ``score`` (logit) and ``prob`` added,
        rows in order."""
        kind = type(table).__module__.split(".")[0]
        if kind == "pandas":
            s = self.score(table["uid"].to_numpy(), table["iid"].to_numpy(), progress)
            out = table.copy()
            out["score"] = s
            out["prob"] = _sigmoid(s)
            return out
        if kind == "polars":
            import polars as pl

            s = self.score(table["uid"].to_numpy(), table["iid"].to_numpy(), progress)
            return table.with_columns(pl.Series("score", s), pl.Series("prob", _sigmoid(s)))
        if kind == "pyarrow":
            import pyarrow as pa

            s = self.score(
                table.column("uid").to_numpy(), table.column("iid").to_numpy(), progress
            )
            return table.append_column("score", pa.array(s)).append_column(
                "prob", pa.array(_sigmoid(s))
            )
        raise TypeError(
            f"score_table takes a pandas or polars DataFrame or a pyarrow Table, not {type(table)!r}"
        )


def _progress_kw(progress: Progress) -> dict:
    return {} if progress is None else {"progress": progress}


def train_cf(
    data: PathLike,
    out: PathLike,
    model: Optional[str] = None,
    config: Union[PathLike, Mapping[str, Any], None] = None,
    resume: bool = False,
    force: bool = False,
    progress: Progress = None,
    **overrides: Any,
) -> dict:
    """Trains a collaborative model (``collm train cf``): ``model`` (mf, lightgcn, sasrec, din)
    and/or ``config`` (a TOML file or a mapping of its fields), with field ``overrides``
    (``dim=64, lr=1e-3, max_epochs=10``...). Returns the run's metrics.json as a dict."""
    if config is None:
        table: dict = {}
    elif isinstance(config, Mapping):
        table = dict(config)
    else:
        table = json.loads(_collm._cf_config_json(os.fspath(config)))
    if model is not None:
        if "model" in table and table["model"] != model:
            raise ValueError(f"model={model!r} contradicts the config's model {table['model']!r}")
        table["model"] = model
    if "model" not in table:
        raise ValueError("give model= (mf, lightgcn, sasrec, din) or a config with 'model'")
    table.update(overrides)
    return _collm._train_cf(
        os.fspath(data), os.fspath(out), json.dumps(table), resume, force, progress
    )


def train(
    config: Union[PathLike, Mapping[str, Any]],
    out: PathLike,
    resume: bool = False,
    force: bool = False,
    progress: Progress = None,
) -> dict:
    """Trains a CoLLM run (``collm train collm``) from a TOML config file or a mapping with the
    same sections (``{"mode": "collm", "data": {...}, "model": {...}, "training": {...}}``).
    ``resume=True`` continues a run from its last checkpoint. Returns metrics.json as a dict."""
    if isinstance(config, Mapping):
        return _collm._train(None, json.dumps(dict(config)), os.fspath(out), resume, force, progress)
    return _collm._train(os.fspath(config), None, os.fspath(out), resume, force, progress)


def prepare(
    source: str, out: PathLike, force: bool = False, progress: Progress = None, **options: Any
) -> dict:
    """Prepares a dataset directory (``collm data prepare SOURCE``). Sources and options:
    ``ml-1m`` (raw=), ``amazon-book`` (reviews=, meta=, year=, activity_threshold=),
    ``collm-tsv`` (input=, name=, item_noun=), ``synthetic`` (users=, items=, rows_per_user=,
    seed=, ...). Returns the manifest as a dict."""
    opts = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in options.items()}
    return _collm._prepare(source, os.fspath(out), json.dumps(opts), force, progress)


def report(
    runs: Iterable[PathLike],
    data: Optional[PathLike] = None,
    split: str = "valid",
    out: Optional[PathLike] = None,
    rescore: bool = False,
    progress: Progress = None,
) -> str:
    """``collm report``: the Table-2-style markdown table of ``runs`` on ``split``
    (collaborative-model runs need ``data``); with ``out``, also report.md and the charts.
    A run holding the scores of an evaluation on ``split`` (``scores-SPLIT.tsv.gz`` or ``.tsv``
    beside it, as ``collm eval --scores-out`` writes them) is reported from them unless
    ``rescore``; the others are evaluated."""
    return _collm.report(
        [os.fspath(r) for r in runs],
        None if data is None else os.fspath(data),
        split,
        None if out is None else os.fspath(out),
        rescore,
        progress,
    )


def flush_denormals(flush: bool = True) -> bool:
    """Flush subnormal floats (|x| < 1.2e-38 in float32) to zero on this thread and the
    engine's threads (x86 FTZ/DAZ), as the ``collm`` binary does from its start; ``False`` keeps
    them again. Off by default here: this is your process, and numpy on this thread flushes
    too. Worth it for long collaborative-model training (``train_cf``): weight decay makes
    subnormal weights, which x86 computes with many times slower (SASRec's late epochs ran 3.3x
    faster flushed). Returns whether they were flushed before. x86-64 only (RuntimeError
    elsewhere)."""
    return _collm._flush_denormals(flush)


def read_split(data: PathLike, split: str) -> dict:
    """A split of a dataset directory as numpy columns ``uid``, ``iid``, ``label``,
    ``timestamp`` (pass to ``pandas.DataFrame`` for a table)."""
    return _collm._split_columns(os.fspath(data), split)


def score_parquet(
    run: PathLike,
    src: PathLike,
    dst: PathLike,
    data: Optional[PathLike] = None,
    progress: Progress = None,
) -> int:
    """``collm score`` on Parquet (through pyarrow): reads ``uid``/``iid`` from ``src``, writes
    the rows with ``score`` and ``prob`` to ``dst`` (atomically: a temporary file renamed),
    returns the number of rows."""
    import pyarrow.parquet as pq

    rec = Recommender(run, data)
    table = rec.score_table(pq.read_table(os.fspath(src)), progress)
    dst = os.fspath(dst)
    if os.path.abspath(dst) == os.path.abspath(os.fspath(src)):
        raise ValueError(f"{dst}: the output would overwrite the input")
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return table.num_rows
