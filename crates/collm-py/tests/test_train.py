"""Training, data and reports from Python: the same runs as the binary's, configs as files or
mappings, bad input refused by name, log records to `logging`, progress callbacks, the GIL
released and Ctrl-C stopping a long call."""

import json
import re
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import collm


def test_train_cf_with_overrides_equals_collm_train_cf(tmp_path, family, collm_bin):
    from conftest import run_bin

    got = collm.train_cf(family["data"], tmp_path / "py", model="mf", dim=8, max_epochs=3, seed=5)
    run_bin(collm_bin, "train", "cf", "--model", "mf", "--data", family["data"], "--dim", 8,
            "--max-epochs", 3, "--seed", 5, "--quiet", "--out", tmp_path / "cli")
    want = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert got["best_epoch"] == want["best_epoch"]
    assert got["best_valid"] == want["best_valid"]
    assert [p["valid_auc"] for p in got["curve"]] == [p["valid_auc"] for p in want["curve"]]
    # A config file is the same as its mapping.
    cfg = tmp_path / "mf.toml"
    cfg.write_text('model = "mf"\ndim = 8\nmax_epochs = 3\nseed = 5\n')
    again = collm.train_cf(family["data"], tmp_path / "file", config=cfg)
    assert again["best_valid"] == want["best_valid"]


def test_bad_configs_and_options_are_value_errors(tmp_path, family):
    with pytest.raises(ValueError, match="dim"):
        collm.train_cf(family["data"], tmp_path / "a", model="mf", dim=0)
    with pytest.raises(ValueError, match="contradicts"):
        collm.train_cf(family["data"], tmp_path / "b", model="mf", config={"model": "din"})
    with pytest.raises(FileNotFoundError):
        collm.train_cf(family["data"], tmp_path / "c", config=tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="mode"):
        collm.train({"mode": "nonsense"}, tmp_path / "d")
    with pytest.raises(ValueError, match="no option \"userz\""):
        collm.prepare("synthetic", tmp_path / "e", userz=3)
    with pytest.raises(ValueError, match="unknown source"):
        collm.prepare("netflix", tmp_path / "f")
    with pytest.raises(ValueError, match="raw= is required"):
        collm.prepare("ml-1m", tmp_path / "g")
    # Nothing half-written: none of the refused calls left an output behind.
    assert sorted(os.listdir(tmp_path)) == []


def test_prepare_refuses_an_existing_dataset_unless_forced(tmp_path):
    m = collm.prepare("synthetic", tmp_path / "d", users=10, items=12, seed=1)
    assert m["num_users"] == 11
    with pytest.raises(Exception, match="force"):
        collm.prepare("synthetic", tmp_path / "d", users=10, items=12, seed=1)
    collm.prepare("synthetic", tmp_path / "d", users=10, items=12, seed=2, force=True)


def test_report_renders_the_table(family, tmp_path):
    md = collm.report([family["mf"], family["collm"]], data=family["data"], split="test", out=tmp_path / "r")
    assert "collm" in md and "mf" in md and "AUC" in md
    assert (tmp_path / "r" / "report.md").read_text() == md
    assert (tmp_path / "r" / "warm_cold.png").stat().st_size > 0
    # A run holding scores of the split is reported from them (here a file that is not scores:
    # the error names it); rescore=True evaluates it again instead.
    mf = tmp_path / "mf"
    shutil.copytree(family["mf"], mf)
    (mf / "scores-test.tsv").write_text("not scores\n")
    with pytest.raises(Exception, match="scores-test.tsv"):
        collm.report([mf], data=family["data"], split="test")
    assert collm.report([mf, family["collm"]], data=family["data"], split="test", rescore=True) == md


def test_logging_and_progress_callback(family, tmp_path, caplog):
    ticks = []
    with caplog.at_level(logging.INFO, logger="collm"):
        collm.train_cf(family["data"], tmp_path / "mf", model="mf", dim=8, max_epochs=2,
                       progress=lambda task, pos, n, msg: ticks.append((task, pos, n, msg)))
    assert any("train mf: epoch 2/2" in r.getMessage() and "valid auc" in r.getMessage() for r in caplog.records)
    assert ("train mf", 2, 2) in [t[:3] for t in ticks]
    # A callback that raises stops the call with its exception.
    def boom(*_):
        raise KeyError("stop")
    with pytest.raises(KeyError):
        collm.train_cf(family["data"], tmp_path / "mf2", model="mf", dim=8, max_epochs=50, progress=boom)


def test_the_gil_is_released_while_the_engine_computes(family, tmp_path):
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    t.start()
    before = counter[0]
    collm.train_cf(family["data"], tmp_path / "mf", model="mf", dim=8, max_epochs=20)
    stop.set()
    t.join()
    assert counter[0] - before > 10


def test_ctrl_c_stops_training_and_the_run_resumes(family, tmp_path):
    cfg = {
        "mode": "collm",
        "name": "long",
        "data": {"path": str(family["data"])},
        "model": {"backbone": str(family["backbone"]), "cf_run": str(family["mf"]),
                  "step1": str(family["tallrec"]), "mapper_mult": 2, "eval_batch_size": 4},
        "training": {"max_steps": 100000, "eval_every": 5, "eval_rows": 8, "batch_size": 4,
                     "warmup_steps": 1, "patience": 100000},
    }
    def interrupted_run(resume, after):
        """Trains in a child process, sends SIGINT once a validation at step `after` or later
        is logged (validations come every 5 steps from step 0; a stopped run resumes from the
        step it stopped at, which need not be one of them)."""
        script = textwrap.dedent(f"""
            import logging, sys, collm
            logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
            try:
                collm.train({json.dumps(cfg)}, {str(tmp_path / "run")!r}, resume={resume})
            except KeyboardInterrupt:
                print("KeyboardInterrupt", flush=True)
                sys.exit(3)
        """)
        p = subprocess.Popen([sys.executable, "-u", "-c", script], stdout=subprocess.PIPE, text=True)
        for line in p.stdout:
            m = re.search(r"step (\d+)/", line)
            if m and int(m.group(1)) >= after:
                break
        p.send_signal(signal.SIGINT)
        t0 = time.time()
        rest = p.stdout.read()
        assert p.wait(timeout=60) == 3, rest
        assert time.time() - t0 < 30
        assert "KeyboardInterrupt" in rest
        return json.loads((tmp_path / "run" / "metrics.json").read_text())

    first = interrupted_run(False, 10)
    assert first["step"] >= 10 and (tmp_path / "run" / "checkpoint").exists()
    # The stop checkpointed the step it came at (the checkpoint's state is metrics.json).
    ckpt = tmp_path / "run" / "checkpoint"
    state = json.loads((ckpt / (ckpt / "CURRENT").read_text().strip() / "state.json").read_text())
    assert state["step"] == first["step"]
    # Resumed, it goes on from its checkpoint: the first curve points are kept.
    second = interrupted_run(True, first["step"] + 10)
    assert second["step"] >= first["step"] + 10
    assert second["curve"][: len(first["curve"])] == first["curve"]
