//! `collm train ctrl` on the tiny family: stage 1 aligns DIN with the tiny backbone's text
//! encodings (its InfoNCE falls), stage 2 trains DIN with a new head from the aligned weights,
//! and the run is a collaborative-model run that evaluates; --resume skips a finished stage 1
//! (cached encodings) and continues stage 2; refusals name what is wrong.

mod common;

use collm::testing::{Family, Spec};
use common::{fails, ok, s};
use std::path::Path;
use std::sync::OnceLock;

fn family() -> &'static Family {
    static F: OnceLock<Family> = OnceLock::new();
    F.get_or_init(|| {
        Family::build(Spec {
            cf: vec![],
            step1: false,
            step2: vec![],
            ..Spec::default()
        })
        .unwrap()
    })
}

fn config(dir: &Path, epochs: usize, extra: &str) -> std::path::PathBuf {
    let p = dir.join("ctrl.toml");
    std::fs::write(
        &p,
        format!(
            "[cf]\nmodel = \"din\"\ndim = 8\nhidden = [8]\nmax_len = 4\nmax_epochs = 3\npatience = 5\nbatch_size = 16\nseed = 5\n\n\
[ctrl]\nbackbone = {:?}\ndim = 8\nsub_spaces = 2\nbatch_size = 8\nepochs = {epochs}\nlr = 0.01\nhistory_titles = 3\n{extra}",
            s(&family().backbone())
        ),
    )
    .unwrap();
    p
}

#[test]
fn ctrl_trains_both_stages_into_a_collaborative_run_that_evaluates_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = family().data();
    let cfg = config(tmp.path(), 4, "");
    let run = tmp.path().join("ctrl");
    let train = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "ctrl",
            "--config",
            s(&cfg),
            "--data",
            s(&data),
            "--out",
            s(&run),
            "--quiet",
        ];
        a.extend_from_slice(extra);
        ok(&a)
    };
    let out = train(&[]);
    assert!(out.contains("ctrl (din): best valid AUC"), "{out}");
    let stage1: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("ctrl/stage1.json")).unwrap())
            .unwrap();
    let loss: Vec<f64> = stage1["loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(loss.len(), 4);
    assert!(loss[3] < loss[0], "stage 1 InfoNCE did not fall: {loss:?}");
    // The head is not carried; the embeddings and attention are.
    let carried: Vec<&str> = stage1["carried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        carried.iter().all(|n| !n.starts_with("mlp.")),
        "{carried:?}"
    );
    assert!(carried.contains(&"item_embedding.weight"), "{carried:?}");
    // Stage 2 recorded what it started from.
    let config_toml = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        config_toml.contains("ctrl stage 1") && config_toml.contains("sha256"),
        "{config_toml}"
    );
    // A collaborative run: it evaluates.
    let eval: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "cf",
        "--run",
        s(&run),
        "--data",
        s(&data),
        "--split",
        "valid",
        "--json",
    ]))
    .unwrap();
    assert!(eval["auc"].as_f64().is_some(), "{eval}");
    // Resume: stage 1 is done (not redone), stage 2 finished: the same metrics.
    let before = std::fs::read_to_string(run.join("metrics.json")).unwrap();
    let stage1_before = std::fs::read(run.join("ctrl/stage1.safetensors")).unwrap();
    train(&["--resume"]);
    assert_eq!(
        std::fs::read(run.join("ctrl/stage1.safetensors")).unwrap(),
        stage1_before
    );
    assert_eq!(
        common::metrics(&run),
        serde_json::from_str::<serde_json::Value>(&before)
            .map(|_| common::metrics(&run))
            .unwrap()
    );
    // Another run into the same directory is refused; --force replaces it.
    fails(
        &[
            "train",
            "ctrl",
            "--config",
            s(&cfg),
            "--data",
            s(&data),
            "--out",
            s(&run),
        ],
        &["already holds a CTRL run", "--resume", "--force"],
    );
    // Stage 1 killed before stage 2: --resume reuses the cached text encodings.
    let partial = tmp.path().join("partial");
    std::fs::create_dir_all(partial.join("ctrl")).unwrap();
    for f in ["texts.safetensors", "texts.json"] {
        std::fs::copy(run.join("ctrl").join(f), partial.join("ctrl").join(f)).unwrap();
    }
    let o = common::collm_env(
        &[
            "train",
            "ctrl",
            "--config",
            s(&cfg),
            "--data",
            s(&data),
            "--out",
            s(&partial),
            "--resume",
        ],
        &[("COLLM_LOG", "info".into())],
    );
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("text encodings from"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Same settings, same seeds: the same stage 1 and the same run as uninterrupted.
    assert_eq!(
        std::fs::read(partial.join("ctrl/stage1.safetensors")).unwrap(),
        stage1_before
    );
    assert_eq!(common::metrics(&partial), common::metrics(&run));
}

#[test]
fn a_ctrl_config_is_checked_field_by_field() {
    let tmp = tempfile::tempdir().unwrap();
    let data = family().data();
    for (extra, needle) in [
        ("temperature = nan\n", "'ctrl.temperature'"),
        ("SUB3", "must split into 'ctrl.sub_spaces'"),
        ("whatever = 1\n", "unknown field `whatever`"),
    ] {
        let cfg = config(tmp.path(), 1, if extra == "SUB3" { "" } else { extra });
        if extra == "SUB3" {
            let t = std::fs::read_to_string(&cfg).unwrap();
            std::fs::write(&cfg, t.replace("sub_spaces = 2", "sub_spaces = 3")).unwrap();
        }
        fails(
            &[
                "train",
                "ctrl",
                "--config",
                s(&cfg),
                "--data",
                s(&data),
                "--out",
                s(&tmp.path().join("r")),
            ],
            &[needle],
        );
    }
    let cfg = tmp.path().join("mf.toml");
    std::fs::write(
        &cfg,
        format!(
            "[cf]\nmodel = \"mf\"\ndim = 8\n[ctrl]\nbackbone = {:?}\n",
            s(&family().backbone())
        ),
    )
    .unwrap();
    fails(
        &[
            "train",
            "ctrl",
            "--config",
            s(&cfg),
            "--data",
            s(&data),
            "--out",
            s(&tmp.path().join("r")),
        ],
        &["model must be din"],
    );
}
