//! Run directories and inputs from the command line: a failed run leaves nothing, `--force`
//! replaces, a run's own config.toml trains it again, edited or truncated inputs are refused,
//! one writer per output, and a closed stdout is a normal end.

mod common;

use common::{collm, fails, metrics, ok};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn synthetic(root: &Path, name: &str, seed: u64) -> PathBuf {
    let data = root.join(name);
    ok(&[
        "data",
        "prepare",
        "synthetic",
        "--users",
        "30",
        "--items",
        "20",
        "--rows-per-user",
        "8",
        "--seed",
        &seed.to_string(),
        "--out",
        data.to_str().unwrap(),
    ]);
    data
}

fn tallrec_config(root: &Path, data: &Path, backbone: &Path, name: &str, extra: &str) -> PathBuf {
    let p = root.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "mode = \"tallrec\"\ndata = {:?}\nbackbone = {:?}\nmax_steps = 2\neval_every = 2\n\
eval_rows = 10\nbatch_size = 4\nwarmup_steps = 1\nlr = 0.01\ntrain_rows = 16\n{extra}",
            data.display().to_string(),
            backbone.display().to_string()
        ),
    )
    .unwrap();
    p
}

#[test]
fn a_run_config_trains_again_force_replaces_and_failures_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = synthetic(root, "data", 1);
    let d = data.to_str().unwrap();
    let run = root.join("mf");
    let r = run.to_str().unwrap();
    let base = ["train", "cf", "--model", "mf", "--data", d, "--dim", "8"];
    let quiet = ["--max-epochs", "3", "--quiet"];
    ok(&[&base[..], &quiet, &["--out", r]].concat());
    fails(
        &[&base[..], &quiet, &["--out", r]].concat(),
        &["already holds a run", "--force"],
    );
    // The run's own config.toml, as --config, trains the same run again.
    let cfg = run.join("config.toml");
    let again = root.join("mf-again");
    ok(&[
        "train",
        "cf",
        "--config",
        cfg.to_str().unwrap(),
        "--data",
        d,
        "--quiet",
        "--out",
        again.to_str().unwrap(),
    ]);
    assert_eq!(metrics(&run), metrics(&again));
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );
    // --force replaces it.
    ok(&[
        &base[..],
        &["--max-epochs", "2", "--quiet", "--force", "--out", r],
    ]
    .concat());
    assert_eq!(metrics(&run)["curve"].as_array().unwrap().len(), 2);

    // CoLLM: the same for an experiment run.
    let backbone = root.join("backbone");
    collm_llm::testing::write_tiny_backbone(&backbone, 1).unwrap();
    let tcfg = tallrec_config(root, &data, &backbone, "tallrec", "");
    let t1 = root.join("t1");
    ok(&[
        "train",
        "collm",
        "--config",
        tcfg.to_str().unwrap(),
        "--quiet",
        "--out",
        t1.to_str().unwrap(),
    ]);
    let t2 = root.join("t2");
    ok(&[
        "train",
        "collm",
        "--config",
        t1.join("config.toml").to_str().unwrap(),
        "--quiet",
        "--out",
        t2.to_str().unwrap(),
    ]);
    assert_eq!(metrics(&t1), metrics(&t2));

    // A run that fails after its directory was made leaves nothing: here the backbone has no
    // tokenizer.
    let broken = root.join("broken-backbone");
    collm_llm::testing::write_tiny_backbone(&broken, 1).unwrap();
    std::fs::remove_file(broken.join("tokenizer.json")).unwrap();
    let bcfg = tallrec_config(root, &data, &broken, "broken", "");
    let out = root.join("failed");
    for _ in 0..2 {
        let o = collm(&[
            "train",
            "collm",
            "--config",
            bcfg.to_str().unwrap(),
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(1));
        assert!(!out.exists(), "a failed run left {}", out.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Settings that train nothing or make no sense are refused before anything is written.
    for (extra, what) in [
        ("clip_norm = -1\n", "clip_norm"),
        ("patience = 0\n", "patience"),
    ] {
        let c = tallrec_config(root, &data, &backbone, "bad", extra);
        fails(
            &[
                "train",
                "collm",
                "--config",
                c.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            &["bad.toml", what],
        );
        assert!(!out.exists());
    }
    let c = tallrec_config(root, &data, &backbone, "zero", "")
        .to_string_lossy()
        .into_owned();
    let text = std::fs::read_to_string(&c)
        .unwrap()
        .replace("max_steps = 2", "max_steps = 0");
    std::fs::write(&c, text).unwrap();
    fails(
        &[
            "train",
            "collm",
            "--config",
            &c,
            "--out",
            out.to_str().unwrap(),
        ],
        &["zero.toml", "max_steps"],
    );
    assert!(!out.exists());

    // Step 2 over a step-1 run trained on other data is refused.
    let other = synthetic(root, "other", 2);
    let s2 = root.join("step2.toml");
    std::fs::write(
        &s2,
        format!(
            "mode = \"collm\"\ndata = {:?}\nbackbone = {:?}\ncf_run = {:?}\nstep1 = {:?}\nmax_steps = 2\n",
            other.display().to_string(),
            backbone.display().to_string(),
            run.display().to_string(),
            t1.display().to_string()
        ),
    )
    .unwrap();
    fails(
        &[
            "train",
            "collm",
            "--config",
            s2.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["'step1'", "t1", "other data"],
    );
    assert!(!out.exists());
}

#[test]
fn an_edited_items_file_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path(), "data", 1);
    ok(&["data", "stats", data.to_str().unwrap()]);
    let items = data.join("items.tsv");
    let text = std::fs::read_to_string(&items).unwrap();
    let line = text.lines().nth(1).unwrap().to_string();
    let edited = text.replacen(&line, &format!("{line} (edited)"), 1);
    std::fs::write(&items, edited).unwrap();
    fails(
        &["data", "stats", data.to_str().unwrap()],
        &["items.tsv", "contents changed"],
    );
    // A manifest written before items_sha256 was recorded: caught through the content hash.
    let mpath = data.join("dataset.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("items_sha256");
    std::fs::write(&mpath, m.to_string()).unwrap();
    fails(
        &["data", "stats", data.to_str().unwrap()],
        &["dataset.json", "does not match the files"],
    );
    std::fs::write(&items, text).unwrap();
    ok(&["data", "stats", data.to_str().unwrap()]);
}

#[test]
fn concurrent_writers_of_one_dataset_get_one_winner() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("data");
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_collm"))
                .args([
                    "data",
                    "prepare",
                    "synthetic",
                    "--users",
                    "2000",
                    "--items",
                    "90",
                    "--out",
                    out.to_str().unwrap(),
                ])
                .env("COLLM_LOG", "error")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let winners = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(winners, 1, "{outs:?}");
    for o in outs.iter().filter(|o| !o.status.success()) {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("another collm process") || e.contains("already exists"),
            "{e}"
        );
    }
    // Later, without --force, the finished dataset is kept.
    fails(
        &[
            "data",
            "prepare",
            "synthetic",
            "--out",
            out.to_str().unwrap(),
        ],
        &["already exists", "--force"],
    );
    ok(&["data", "stats", out.to_str().unwrap()]);
}

#[test]
fn a_closed_stdout_is_a_normal_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path(), "data", 1);
    let mut child = Command::new(env!("CARGO_BIN_EXE_collm"))
        .args(["data", "stats", data.to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before anything is printed
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_cf_sweep_trains_each_point_and_ranks_them_by_valid_auc() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path(), "data", 4);
    let out = tmp.path().join("sweep");
    let args = [
        "train",
        "cf-sweep",
        "--model",
        "mf",
        "--data",
        data.to_str().unwrap(),
        "--max-epochs",
        "3",
        "--quiet",
        "--lrs",
        "1e-1,1e-3",
        "--wds",
        "1e-4",
        "--dims",
        "8",
        "--out",
        out.to_str().unwrap(),
    ];
    let stdout = ok(&args);
    let tsv = std::fs::read_to_string(out.join("results.tsv")).unwrap();
    let rows: Vec<Vec<&str>> = tsv.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(
        rows[0],
        [
            "name",
            "dim",
            "lr",
            "weight_decay",
            "best_epoch",
            "valid_auc",
            "valid_uauc"
        ]
    );
    assert_eq!(rows.len(), 3, "{tsv}");
    // Best first; each row is its run's own best validation.
    let auc = |r: &Vec<&str>| r[5].parse::<f64>().unwrap();
    assert!(auc(&rows[1]) >= auc(&rows[2]), "{tsv}");
    for r in &rows[1..] {
        let m = metrics(&out.join("runs").join(r[0]));
        let best = m["best_valid"]["auc"].as_f64().unwrap();
        assert_eq!(collm_metrics::fmt_metric(Some(best)), r[5], "{}", r[0]);
    }
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.starts_with("| run | d | lr | wd | best epoch | valid AUC | valid UAUC |\n|---|---|---|---|---|---|---|\n"), "{md}");
    assert!(
        stdout.contains(&md) && stdout.contains(&format!("best: {}", rows[1][0])),
        "{stdout}"
    );
    let best = collm_cf::CfConfig::load(&out.join("best.toml")).unwrap();
    assert_eq!(format!("{:e}", best.lr), rows[1][2]);
}

/// `collm bench denormals` on a tiny trained run: it counts the run's subnormal weights, trains
/// from them both ways and refuses a missing run by name (its speed is a benchmark, not a
/// test); the binary flushes unless COLLM_DENORMALS says keep, and says which.
#[test]
fn bench_denormals_trains_a_run_both_ways_and_counts_its_subnormal_weights() {
    if !cfg!(target_arch = "x86_64") {
        return; // flushing is x86-64 only; the bench refuses elsewhere
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = synthetic(root, "data", 3);
    let d = data.to_str().unwrap();
    let run = root.join("mf");
    let r = run.to_str().unwrap();
    ok(&[
        "train",
        "cf",
        "--model",
        "mf",
        "--data",
        d,
        "--dim",
        "8",
        "--max-epochs",
        "2",
        "--quiet",
        "--out",
        r,
    ]);
    let out = ok(&[
        "bench",
        "denormals",
        "--run",
        r,
        "--data",
        d,
        "--epochs",
        "1",
    ]);
    let j: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(j["model"], "mf");
    assert!(j["params"].as_u64().unwrap() > 0, "{j}");
    // Trained for 2 epochs from N(0, σ) initialisations: nothing subnormal yet.
    assert_eq!(j["subnormal_params"], 0, "{j}");
    for k in ["kept_epoch_seconds", "flushed_epoch_seconds", "speedup"] {
        assert!(j[k].as_f64().unwrap() > 0.0, "{k}: {j}");
    }
    // With no subnormal value anywhere, both ways train the same numbers.
    assert_eq!(j["kept_loss"], j["flushed_loss"], "{j}");
    assert!(out.contains("0 of ") && out.contains("flushed"), "{out}");
    // The binary flushes unless told to keep; the kernel report says which.
    assert!(ok(&["llm", "kernel"]).contains("denormals: flushed to zero"));
    let keep = common::collm_env(&["llm", "kernel"], &[("COLLM_DENORMALS", "keep".into())]);
    assert!(String::from_utf8_lossy(&keep.stdout).contains("denormals: kept"));
    let bad = common::collm_env(&["llm", "kernel"], &[("COLLM_DENORMALS", "fast".into())]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("COLLM_DENORMALS=fast"));
    fails(
        &[
            "bench",
            "denormals",
            "--run",
            &format!("{r}-missing"),
            "--data",
            d,
        ],
        &["mf-missing", "config.toml"],
    );
}
