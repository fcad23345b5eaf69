"""collm.Recommender: the same scores, rankings and reports as the `collm` binary, in input
order, from any kind of id sequence or table; errors as the exceptions a caller expects."""

import json

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import collm
from conftest import run_bin


def cli_scores(binary, run, pairs, tmp_path, data=None):
    src = tmp_path / "pairs.tsv"
    src.write_text("uid\tiid\n" + "".join(f"{u}\t{i}\n" for u, i in pairs))
    dst = tmp_path / "scored.tsv"
    args = ["score", "--run", run, "--input", src, "--out", dst]
    if data is not None:
        args += ["--data", data]
    run_bin(binary, *args)
    lines = dst.read_text().splitlines()[1:]
    return np.array([float(x.split("\t")[2]) for x in lines])


@pytest.mark.parametrize("kind", ["collm", "mf"])
def test_scores_equal_collm_score_in_input_order(family, collm_bin, tmp_path, kind):
    data = None if kind == "collm" else family["data"]
    rec = collm.Recommender(family[kind], data)
    assert rec.kind == ("collm" if kind == "collm" else "cf")
    cols = collm.read_split(family["data"], "test")
    u, i = cols["uid"], cols["iid"]
    got = rec.score(u, i)
    assert got.dtype == np.float64 and got.shape == u.shape
    want = cli_scores(collm_bin, family[kind], zip(u, i), tmp_path, data)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # Any order, any int sequence: the same score per pair.
    rev = rec.score(list(u[::-1]), pd.Series(i[::-1]))
    np.testing.assert_allclose(rev, got[::-1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(rec.probabilities(u, i), 1 / (1 + np.exp(-got)))


def test_score_table_for_pandas_polars_and_arrow(family):
    rec = collm.Recommender(family["collm"])
    cols = collm.read_split(family["data"], "valid")
    want = rec.score(cols["uid"], cols["iid"])
    df = pd.DataFrame({"uid": cols["uid"], "iid": cols["iid"], "label": cols["label"]})
    out = rec.score_table(df)
    assert list(out.columns) == ["uid", "iid", "label", "score", "prob"]
    np.testing.assert_allclose(out["score"], want, atol=1e-9)
    assert "score" not in df.columns  # the input is not modified
    outp = rec.score_table(pl.from_pandas(df))
    assert isinstance(outp, pl.DataFrame)
    np.testing.assert_allclose(outp["score"].to_numpy(), want, atol=1e-9)
    outa = rec.score_table(pa.Table.from_pandas(df))
    assert isinstance(outa, pa.Table) and outa.column_names[-2:] == ["score", "prob"]
    np.testing.assert_allclose(outa.column("prob").to_numpy(), 1 / (1 + np.exp(-want)), atol=1e-9)
    with pytest.raises(TypeError):
        rec.score_table({"uid": [1], "iid": [1]})


def test_score_parquet(family, tmp_path):
    cols = collm.read_split(family["data"], "test")
    src = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"uid": cols["uid"], "iid": cols["iid"]}), src)
    dst = tmp_path / "scored.parquet"
    n = collm.score_parquet(family["collm"], src, dst)
    assert n == len(cols["uid"])
    t = pq.read_table(dst)
    want = collm.Recommender(family["collm"]).score(cols["uid"], cols["iid"])
    np.testing.assert_allclose(t.column("score").to_numpy(), want, atol=1e-9)
    with pytest.raises(ValueError, match="overwrite the input"):
        collm.score_parquet(family["collm"], src, src)


def test_rank_equals_collm_rank(family, collm_bin):
    rec = collm.Recommender(family["collm"])
    got = rec.rank(user=3, k=5)
    assert len(got) == 5 and set(got[0]) == {"item", "score", "title"}
    assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)
    want = json.loads(run_bin(collm_bin, "rank", "--run", family["collm"], "--user", 3, "--k", 5, "--json"))
    items = want["items"] if isinstance(want, dict) else want
    assert [r["item"] for r in got] == [r["item"] for r in items]
    # A cold user given by a history, among given candidates.
    cold = rec.rank(history=[1, 2, 3], k=2, candidates=[4, 5, 6, 7])
    assert len(cold) == 2 and {r["item"] for r in cold} <= {4, 5, 6, 7}
    assert cold[0]["title"] == rec.title(cold[0]["item"])


def test_evaluate_equals_collm_eval(family, collm_bin):
    rec = collm.Recommender(family["collm"])
    want = json.loads(run_bin(collm_bin, "eval", "collm", "--run", family["collm"], "--split", "test", "--json"))
    got = rec.evaluate("test")
    assert got.keys() == want.keys()
    assert got["n"] == want["n"]
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-6)
    report, scores = rec.evaluate("test", scores=True)
    assert scores.shape == (report["n"],)
    assert collm.metrics.auc(collm.read_split(family["data"], "test")["label"], scores) == pytest.approx(report["auc"])


def test_errors_are_python_exceptions_with_the_clis_messages(family, tmp_path):
    rec = collm.Recommender(family["collm"])
    with pytest.raises(ValueError, match=r"item 99: .*item ids run from 1 to 30"):
        rec.score([1], [99])
    with pytest.raises(ValueError, match=r"unknown user 0"):
        rec.score([0], [1])
    with pytest.raises(ValueError, match="ids are positive"):
        rec.score([-1], [1])
    with pytest.raises(ValueError, match="differ in length"):
        rec.score([1, 2], [1])
    with pytest.raises(ValueError, match="ids are integers"):
        rec.score([1.5], [1])
    with pytest.raises(ValueError, match="not both"):
        rec.rank(user=1, history=[2])
    with pytest.raises(ValueError, match="unknown item 77"):
        rec.rank(user=1, candidates=[77])
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        collm.Recommender(tmp_path / "no-such-run")
    with pytest.raises(ValueError, match="needs its dataset"):
        collm.Recommender(family["mf"])
    with pytest.raises(ValueError):
        rec.evaluate("nope")
