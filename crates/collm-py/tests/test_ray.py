"""collm.ray.score_dataset on a local Ray cluster that the test starts and stops itself (one
node, this machine only, two scoring actors): every row of the tiny CoLLM run's test split
gets the score `collm score` gives. (Ray binds its services to the machine's own address,
not 127.0.0.1: it resolves loopback to the node's IP on purpose.)"""

import numpy as np
import pandas as pd
import pytest

import collm

ray = pytest.importorskip("ray")
import collm.ray  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    # 4 logical CPUs on the 2 cores: the two scoring actors hold one each, and Ray Data's read
    # and split tasks need the rest (with 2 they would wait for the actors forever).
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


@pytest.mark.timeout(300)
def test_ray_scores_equal_collm_score(cluster, family, collm_bin, tmp_path):
    from test_recommender import cli_scores

    cols = collm.read_split(family["data"], "test")
    key = np.arange(len(cols["uid"]))
    ds = ray.data.from_pandas(
        pd.DataFrame({"key": key, "uid": cols["uid"], "iid": cols["iid"]})
    ).repartition(4)
    scored = collm.ray.score_dataset(ds, family["collm"], batch_size=8, concurrency=2, num_cpus=1)
    rows = sorted(scored.take_all(), key=lambda r: r["key"])
    assert [int(r["key"]) for r in rows] == list(key)
    got = np.array([r["score"] for r in rows])
    want = cli_scores(collm_bin, family["collm"], zip(cols["uid"], cols["iid"]), tmp_path)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["prob"] for r in rows], 1 / (1 + np.exp(-want)), atol=1e-6)
