//! `collm compact` leaves the old run or the new one at every crash point, refuses a run that
//! is training or has not finished, says so for a run already in half precision; a
//! collaborative run's weights are checked against the manifest written with them.

mod common;

use collm::experiment::Mode;
use collm::testing::{Family, Spec};
use collm_cf::ModelKind;
use common::{collm_env, copy_dir, fails, ok, s};
use std::path::Path;
use std::sync::OnceLock;

fn family() -> &'static Family {
    static F: OnceLock<Family> = OnceLock::new();
    F.get_or_init(|| {
        Family::build(Spec {
            step2: vec![Mode::Collm],
            ..Spec::default()
        })
        .unwrap()
    })
}

/// The float dtypes of every weights file of `run` (its best/ files, or model.safetensors).
fn dtypes(run: &Path) -> Vec<String> {
    let files: Vec<std::path::PathBuf> = if run.join("model.safetensors").is_file() {
        vec![run.join("model.safetensors")]
    } else {
        std::fs::read_dir(run.join("best"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect()
    };
    let mut out: Vec<String> = files
        .iter()
        .flat_map(|p| {
            candle_core::safetensors::load(p, &candle_core::Device::Cpu)
                .unwrap()
                .into_values()
                .map(|t| format!("{:?}", t.dtype()))
                .filter(|d| d.starts_with('F') || d.starts_with("BF"))
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The run loads and evaluates.
fn evaluates(run: &Path) {
    let o = if run.join("model.safetensors").is_file() {
        collm_env(
            &[
                "eval",
                "cf",
                "--run",
                s(run),
                "--data",
                s(&family().data()),
                "--split",
                "valid",
                "--json",
            ],
            &[],
        )
    } else {
        collm_env(
            &[
                "eval",
                "collm",
                "--run",
                s(run),
                "--split",
                "valid",
                "--json",
            ],
            &[],
        )
    };
    assert!(o.status.success(), "{}: {o:?}", run.display());
}

fn leftovers(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.compact")))
        .collect()
}

/// Kills `collm compact` of a copy of `src` at each of its crash points: each time the run at
/// the path is the old one or the new one, whole, loads, and the next compact finishes it.
fn kill_at_every_point(src: &Path) -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let mut points = 0;
    for n in 1.. {
        let run = tmp.path().join(format!("run-{n}"));
        copy_dir(src, &run);
        let o = collm_env(
            &["compact", s(&run), "--dtype", "f16"],
            &[("COLLM_CRASH_AT", n.to_string())],
        );
        if o.status.success() {
            assert_eq!(dtypes(&run), ["F16"], "uninterrupted");
            evaluates(&run);
            break;
        }
        assert!(o.status.code().is_none(), "point {n}: not an abort: {o:?}");
        points += 1;
        // A swap cut between its two renames (where the file system cannot exchange) leaves no
        // run at the path until the next compact; with an exchange there is always one.
        if run.exists() {
            let d = dtypes(&run);
            assert!(d == ["F32"] || d == ["F16"], "point {n}: a mix {d:?}");
            evaluates(&run);
        }
        ok(&["compact", s(&run), "--dtype", "f16"]);
        assert_eq!(dtypes(&run), ["F16"], "point {n}, then compact");
        evaluates(&run);
        assert!(
            leftovers(tmp.path(), &format!("run-{n}")).is_empty(),
            "point {n}: {:?}",
            leftovers(tmp.path(), &format!("run-{n}"))
        );
    }
    points
}

#[test]
fn a_killed_compact_leaves_the_old_run_or_the_new_one() {
    let f = family();
    let collm_points = kill_at_every_point(&f.run(Mode::Collm));
    let cf_points = kill_at_every_point(&f.cf_run(ModelKind::Mf));
    assert!(
        collm_points >= 4 && cf_points >= 4,
        "{collm_points} / {cf_points} crash points"
    );
}

#[test]
fn compact_refuses_a_run_that_is_training_or_unfinished_and_names_a_half_run() {
    let f = family();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("collm");
    copy_dir(&f.run(Mode::Collm), &run);
    // Another process holds the run (a trainer would).
    {
        let _lock = collm_core::io::OutputLock::acquire(&run).unwrap();
        fails(
            &["compact", s(&run)],
            &["another collm process is writing it"],
        );
    }
    assert_eq!(dtypes(&run), ["F32"]);
    // Not finished: metrics.json has no reason it stopped (as a killed run's).
    let m = run.join("metrics.json");
    let text = std::fs::read_to_string(&m).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["stopped"] = serde_json::Value::Null;
    std::fs::write(&m, serde_json::to_string(&v).unwrap()).unwrap();
    fails(
        &["compact", s(&run)],
        &["has not finished training", "--resume"],
    );
    assert_eq!(dtypes(&run), ["F32"]);
    std::fs::write(&m, text).unwrap();
    // f16, then bf16: already half precision, left as it is.
    ok(&["compact", s(&run), "--dtype", "f16"]);
    let again = ok(&["compact", s(&run), "--dtype", "bf16"]);
    assert!(again.contains("already in half precision (f16)"), "{again}");
    assert_eq!(dtypes(&run), ["F16"]);
}

#[test]
fn a_cf_run_with_another_runs_weights_is_refused_and_an_old_run_still_loads() {
    let f = family();
    let tmp = tempfile::tempdir().unwrap();
    let data = f.data();
    let train = |out: &Path, seed: &str| {
        ok(&[
            "train",
            "cf",
            "--model",
            "mf",
            "--data",
            s(&data),
            "--dim",
            "8",
            "--max-epochs",
            "2",
            "--seed",
            seed,
            "--quiet",
            "--out",
            s(out),
        ]);
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    train(&a, "1");
    train(&b, "2");
    assert!(a.join("weights.sha256.json").is_file());
    std::fs::copy(b.join("model.safetensors"), a.join("model.safetensors")).unwrap();
    fails(
        &[
            "eval",
            "cf",
            "--run",
            s(&a),
            "--data",
            s(&data),
            "--split",
            "valid",
        ],
        &["model.safetensors", "changed since the run wrote it"],
    );
    // A run written before the manifest was kept loads as before.
    std::fs::remove_file(a.join("weights.sha256.json")).unwrap();
    ok(&[
        "eval",
        "cf",
        "--run",
        s(&a),
        "--data",
        s(&data),
        "--split",
        "valid",
    ]);
}
