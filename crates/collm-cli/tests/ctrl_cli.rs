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

#[test]
fn a_ctrl_sweep_encodes_the_texts_once_and_each_point_is_the_ctrl_run_of_its_settings() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = family().data();
    let cfg = config(tmp.path(), 2, "");
    let out = tmp.path().join("sweep");
    let sweep = |subs: &str| {
        vec![
            "train".to_string(),
            "ctrl-sweep".into(),
            "--config".into(),
            s(&cfg).into(),
            "--data".into(),
            s(&data).into(),
            "--out".into(),
            s(&out).into(),
            "--sub-spaces".into(),
            subs.into(),
            "--quiet".into(),
        ]
    };
    // A point whose M does not divide ctrl.dim (8) is refused before anything is encoded.
    let bad = sweep("1,3");
    fails(
        &bad.iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            "sweep point ctrl-m3-b8-e2",
            "must split into 'ctrl.sub_spaces'",
        ],
    );
    assert!(!out.join("texts").exists() && !out.join("runs").exists());

    let args = sweep("1,2");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = common::collm_env(&args, &[("COLLM_LOG", "info".into())]);
    assert!(o.status.success(), "{o:?}");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    // Encoded once (into OUT/texts), read from there by both points: the same file.
    assert_eq!(stderr.matches("text encodings from").count(), 2, "{stderr}");
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let shared = ino(&out.join("texts/texts.safetensors"));
    for name in ["ctrl-m1-b8-e2", "ctrl-m2-b8-e2"] {
        let dir = out.join("runs").join(name).join("ctrl");
        assert_eq!(ino(&dir.join("texts.safetensors")), shared, "{name}");
    }
    // Two points, best valid AUC first; best.toml is the first point's config.
    let tsv = std::fs::read_to_string(out.join("results.tsv")).unwrap();
    let lines: Vec<Vec<&str>> = tsv
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(lines.len(), 2, "{tsv}");
    let auc = |l: &Vec<&str>| l[6].parse::<f64>().unwrap();
    assert!(auc(&lines[0]) >= auc(&lines[1]), "{tsv}");
    let loss: f64 = lines[0][4].parse().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{tsv}");
    assert!(
        stdout.contains(&format!("best: {}", lines[0][0])),
        "{stdout}"
    );
    let best = collm::ctrl::CtrlConfig::load(&out.join("best.toml")).unwrap();
    assert_eq!(best.ctrl.sub_spaces.to_string(), lines[0][1]);
    let base = collm::ctrl::CtrlConfig::load(&cfg).unwrap();
    let mut expect = base.clone();
    expect.ctrl.sub_spaces = best.ctrl.sub_spaces;
    assert_eq!(
        best, expect,
        "best.toml differs from the base in more than M"
    );
    // The M = 1 point is exactly `collm train ctrl` with M = 1.
    let one = tmp.path().join("m1.toml");
    std::fs::write(
        &one,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("sub_spaces = 2", "sub_spaces = 1"),
    )
    .unwrap();
    let alone = tmp.path().join("alone");
    ok(&[
        "train",
        "ctrl",
        "--config",
        s(&one),
        "--data",
        s(&data),
        "--out",
        s(&alone),
        "--quiet",
    ]);
    let point = out.join("runs/ctrl-m1-b8-e2");
    assert_eq!(common::metrics(&point), common::metrics(&alone));
    assert_eq!(
        std::fs::read(point.join("ctrl/stage1.safetensors")).unwrap(),
        std::fs::read(alone.join("ctrl/stage1.safetensors")).unwrap()
    );
    // Run again: every point resumes finished, nothing retrains, the same table.
    let stage1 = std::fs::metadata(point.join("ctrl/stage1.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    ok(&args);
    assert_eq!(
        std::fs::read_to_string(out.join("results.tsv")).unwrap(),
        tsv
    );
    assert_eq!(
        std::fs::metadata(point.join("ctrl/stage1.safetensors"))
            .unwrap()
            .modified()
            .unwrap(),
        stage1
    );
}
