//! A shipped run evaluates on its data with a test split added (the shared ML-1M split is
//! released without one), and refuses any other data, naming the split that differs; runs
//! written before the per-file hashes were recorded still load.

use collm::experiment::Mode;
use collm::pipeline::evaluate_run;
use collm::testing::{Family, Spec};
use collm_cf::ModelKind;
use collm_data::dataset::write_dataset;
use collm_data::sources::synthetic::prepare;
use std::path::Path;
use std::sync::OnceLock;

fn family() -> &'static Family {
    static F: OnceLock<Family> = OnceLock::new();
    F.get_or_init(|| {
        Family::build(Spec {
            without_test: true,
            ..Spec::default()
        })
        .unwrap()
    })
}

/// The family's runs: (CF run, CoLLM run).
fn runs() -> [(std::path::PathBuf, bool); 2] {
    let f = family();
    [(f.cf_run(ModelKind::Mf), true), (f.run(Mode::Collm), false)]
}

fn eval(run: &Path, data: &Path, split: &str) -> anyhow::Result<collm::pipeline::Evaluation> {
    evaluate_run(run, Some(data), split, false)
}

#[test]
fn runs_evaluate_on_their_data_with_a_test_split_added() {
    let f = family();
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let ds = f.full_data(&full).unwrap();
    let test_rows = ds.split("test").unwrap().rows.len();
    assert!(test_rows > 0);
    for (run, _) in runs() {
        // The valid split scores exactly as on the data the run was trained on.
        let before = eval(&run, &f.data(), "valid").unwrap();
        let after = eval(&run, &full, "valid").unwrap();
        assert_eq!(before.scores, after.scores, "{}", run.display());
        let test = eval(&run, &full, "test").unwrap();
        assert_eq!(test.scores.len(), test_rows);
        assert!(test.report.auc.is_some());
        // Without --data, a CoLLM run still reads the data it recorded (no test split there).
        if !run.ends_with("cf-mf") {
            let e = evaluate_run(&run, None, "test", false).err().unwrap();
            assert!(format!("{e:#}").contains("no split named 'test'"), "{e:#}");
        }
    }
}

/// Writes the family's data with its test split (as [`Family::full_data`]) and `change`
/// applied to one split's rows.
fn altered(dir: &Path, split: &str, change: impl Fn(&mut collm_data::Interaction)) {
    let mut data = prepare(&family().spec.data).unwrap();
    let known = family().ds.num_users() as u32 - 1;
    for s in &mut data.splits {
        if s.name == "test" {
            s.rows.retain(|r| r.uid <= known);
        }
        if s.name == split {
            for r in s.rows.iter_mut().take(3) {
                change(r);
            }
        }
    }
    write_dataset(data, dir, false).unwrap();
}

#[test]
fn other_data_is_refused_naming_the_split_that_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let flip = |r: &mut collm_data::Interaction| r.label = 1 - r.label;
    for split in ["train", "valid"] {
        let dir = tmp.path().join(split);
        altered(&dir, split, flip);
        for (run, _) in runs() {
            let e = format!("{:#}", eval(&run, &dir, "test").err().unwrap());
            assert!(
                e.contains("other data") && e.contains(&format!("the '{split}' split")),
                "{split}: {e}"
            );
        }
    }
    // Another seed: other users, items and titles.
    let dir = tmp.path().join("seed");
    let mut opts = family().spec.data.clone();
    opts.seed += 1;
    write_dataset(prepare(&opts).unwrap(), &dir, false).unwrap();
    for (run, _) in runs() {
        let e = format!("{:#}", eval(&run, &dir, "test").err().unwrap());
        assert!(e.contains("other data"), "{e}");
    }
}

#[test]
fn added_ids_beyond_the_trained_ones_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("more-users");
    let mut data = prepare(&family().spec.data).unwrap();
    let max = data
        .splits
        .iter()
        .flat_map(|s| s.rows.iter().map(|r| r.uid))
        .max()
        .unwrap();
    let test = data.splits.iter_mut().find(|s| s.name == "test").unwrap();
    test.rows[0].uid = max + 5;
    write_dataset(data, &dir, false).unwrap();
    for (run, _) in runs() {
        let e = format!("{:#}", eval(&run, &dir, "test").err().unwrap());
        assert!(e.contains("user ids") && e.contains("no embedding"), "{e}");
    }
}

/// Runs written before the per-file hashes: their config without them.
#[test]
fn runs_without_per_file_hashes_match_by_content_over_fewer_splits() {
    let f = family();
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    f.full_data(&full).unwrap();
    let train_changed = tmp.path().join("train");
    altered(&train_changed, "train", |r| r.label = 1 - r.label);
    for (run, cf) in runs() {
        let old = tmp.path().join(run.file_name().unwrap());
        copy_dir(&run, &old);
        let cfg = old.join("config.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        let kept: String = text
            .lines()
            .filter(|l| {
                !l.starts_with("files_sha256")
                    && !l.starts_with("data_files_sha256")
                    && !l.starts_with("data_sizes")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        // The per-file tables are TOML sub-tables: drop them whole.
        let kept = drop_tables(&kept, &["data.files_sha256", "refs.data_files_sha256"]);
        assert!(!kept.contains("files_sha256") && kept != text, "{kept}");
        std::fs::write(&cfg, kept).unwrap();
        let before = eval(&run, &full, "test").unwrap();
        let after = eval(&old, &full, "test").unwrap();
        assert_eq!(before.scores, after.scores);
        let e = format!("{:#}", eval(&old, &train_changed, "test").err().unwrap());
        assert!(e.contains("other data"), "{cf}: {e}");
    }
}

fn drop_tables(toml: &str, names: &[&str]) -> String {
    let mut out = String::new();
    let mut skip = false;
    for l in toml.lines() {
        if l.starts_with('[') {
            skip = names.iter().any(|n| l.trim() == format!("[{n}]"));
        }
        if !skip {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let q = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &q);
        } else {
            std::fs::copy(&p, &q).unwrap();
        }
    }
}

/// A run written before the per-file hashes resumes (and records them from then on).
#[test]
fn a_run_without_per_file_hashes_resumes() {
    use collm::train::{train, TrainOptions};
    let f = family();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("tallrec");
    let mut cfg = f.config(Mode::Tallrec);
    (cfg.training.max_steps, cfg.training.eval_every) = (4, 2);
    let opts = |resume, stop_after| TrainOptions {
        resume,
        force: false,
        quiet: true,
        stop_after,
    };
    // Interrupted after its first validation (step 2 of 4).
    assert_eq!(train(&cfg, &run, &opts(false, Some(1))).unwrap().step, 2);
    let path = run.join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let old = drop_tables(
        &text
            .lines()
            .filter(|l| !l.starts_with("data_sizes"))
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
        &["refs.data_files_sha256"],
    );
    assert!(!old.contains("data_files_sha256") && !old.contains("data_sizes"));
    std::fs::write(&path, old).unwrap();
    let st = train(&cfg, &run, &opts(true, None)).unwrap();
    assert_eq!(st.step, 4);
    let now = std::fs::read_to_string(&path).unwrap();
    assert!(
        now.contains("data_files_sha256") && now.contains("data_sizes"),
        "{now}"
    );
}
