"""The metrics collm reports, on your own arrays: ``auc`` (= scikit-learn's ``roc_auc_score``),
``uauc`` (= the reference code's ``uAUC_me``: the mean of per-user AUCs over users with both
classes) and ``subsets`` (AUC/UAUC overall and on the warm/cold row subsets of a dataset's
split: what ``collm eval scores --json`` prints)."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np

from . import _collm

__all__ = ["auc", "uauc", "subsets"]


def _labels(labels: Any) -> np.ndarray:
    a = np.asarray(labels)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if a.size and not np.all((a == 0) | (a == 1)):
        bad = int(np.flatnonzero((a != 0) & (a != 1))[0])
        raise ValueError(f"labels[{bad}] = {a[bad].item()!r}: labels are 0 or 1")
    return np.ascontiguousarray(a, dtype=np.uint8)


def _scores(scores: Any, n: int) -> np.ndarray:
    s = np.ascontiguousarray(np.asarray(scores, dtype=np.float64))
    if s.ndim != 1 or s.shape[0] != n:
        raise ValueError(f"scores has shape {s.shape}, labels ({n},)")
    return s


def auc(labels: Any, scores: Any) -> Optional[float]:
    """ROC AUC of ``scores`` against 0/1 ``labels`` (ties count one half); ``None`` when only
    one class is present."""
    lab = _labels(labels)
    return _collm._auc(lab, _scores(scores, lab.shape[0]))


def uauc(labels: Any, scores: Any, users: Any, return_users: bool = False) -> Any:
    """UAUC: per-user AUC averaged over the users that have both classes (``None`` when none
    has). With ``return_users=True``, ``(uauc, number of users counted)``."""
    lab = _labels(labels)
    u = np.ascontiguousarray(np.asarray(users), dtype=np.int64)
    value, counted = _collm._uauc(lab, _scores(scores, lab.shape[0]), u)
    return (value, counted) if return_users else value


def subsets(data: Union[str, "os.PathLike[str]"], split: str, scores: Any) -> dict:
    """The report of ``scores`` (one per row of ``split``, in the split's order) on the dataset
    directory ``data``: ``auc``, ``uauc``, ``n``, ``uauc_users`` and ``subsets`` (warm, cold,
    warm4, cold4, seen, unseen), as ``collm eval scores --json``."""
    s = np.ascontiguousarray(np.asarray(scores, dtype=np.float64))
    return _collm._subsets(os.fspath(data), split, s)
