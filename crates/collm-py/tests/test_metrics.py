"""collm.metrics equals scikit-learn's roc_auc_score and the reference code's uAUC_me."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import collm


def reference_uauc(labels, scores, users):
    """The CoLLM reference's uAUC_me: per-user roc_auc_score over users with both classes."""
    aucs = []
    for u in np.unique(users):
        m = users == u
        if len(np.unique(labels[m])) == 2:
            aucs.append(roc_auc_score(labels[m], scores[m]))
    return float(np.mean(aucs)), len(aucs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_uauc_equal_the_references(seed):
    rng = np.random.default_rng(seed)
    n = 500
    users = rng.integers(1, 40, n)
    labels = rng.integers(0, 2, n)
    # Rounded scores: many ties, which both count one half.
    scores = np.round(rng.normal(size=n) + 0.5 * labels, 1)
    assert collm.metrics.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    want, counted = reference_uauc(labels, scores, users)
    got = collm.metrics.uauc(labels, scores, users, return_users=True)
    assert got[0] == pytest.approx(want, abs=1e-12)
    assert got[1] == counted
    # Lists, booleans and pandas columns are the same arrays.
    assert collm.metrics.auc(list(labels.astype(bool)), list(scores)) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12
    )


def test_undefined_metrics_are_none():
    assert collm.metrics.auc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert collm.metrics.uauc([0, 1], [0.1, 0.2], [1, 2]) is None


def test_bad_metric_input_is_a_value_error():
    with pytest.raises(ValueError, match=r"labels\[1\] = 2"):
        collm.metrics.auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="shape"):
        collm.metrics.auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="users has 1 entries"):
        collm.metrics.uauc([0, 1], [0.1, 0.2], [1])


def test_subsets_equal_collm_eval_scores(family, collm_bin, tmp_path):
    from conftest import run_bin
    import json

    cols = collm.read_split(family["data"], "test")
    scores = np.linspace(-1, 1, len(cols["uid"]))
    got = collm.metrics.subsets(family["data"], "test", scores)
    f = tmp_path / "scores.tsv"
    f.write_text("uid\tiid\tscore\n" + "".join(f"{u}\t{i}\t{float(s)!r}\n" for u, i, s in zip(cols["uid"], cols["iid"], scores)))
    want = json.loads(run_bin(collm_bin, "eval", "scores", "--data", family["data"], "--split", "test", "--scores", f, "--json"))
    assert got == want
    assert got["auc"] == pytest.approx(roc_auc_score(cols["label"], scores), abs=1e-12)
    with pytest.raises(ValueError, match="3 scores for the"):
        collm.metrics.subsets(family["data"], "test", [0.1, 0.2, 0.3])


def test_flush_denormals_flushes_this_thread_and_keeps_again():
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        with pytest.raises(RuntimeError, match="x86-64 only"):
            collm.flush_denormals()
        return
    tiny = np.float32(1e-30) * np.float32(1e-10)
    assert 0 < tiny < np.finfo(np.float32).tiny
    assert collm.flush_denormals(True) is False  # the default here: kept
    try:
        assert np.float32(1e-30) * np.float32(1e-10) == 0
    finally:
        assert collm.flush_denormals(False) is True
    assert np.float32(1e-30) * np.float32(1e-10) == tiny
