//! The library's jobs end to end on tiny data with a tiny backbone: the quickstart writes its
//! runs, report and charts, `evaluate_run` evaluates runs of both kinds, and a report reads the
//! scores an evaluation left beside a run.

use collm::compact::{compact, Compaction};
use collm::pipeline::{evaluate_run, quickstart, report, QuickstartOptions, Scores};
use collm_data::sources::synthetic::SyntheticOptions;
use collm_metrics::RunKind;
use std::path::Path;

/// A quickstart sized for a test: tiny data, 2 optimizer steps per step.
fn options(out: &std::path::Path, backbone: &std::path::Path) -> QuickstartOptions {
    QuickstartOptions {
        out: out.to_path_buf(),
        backbone: backbone.to_path_buf(),
        step1_steps: 2,
        step2_steps: 2,
        batch_size: 4,
        layers: 0,
        history: 3,
        synthetic: SyntheticOptions {
            users: 40,
            items: 30,
            rows_per_user: 8.0,
            ..Default::default()
        },
    }
}

#[test]
fn the_quickstart_runs_end_to_end_and_its_runs_evaluate() {
    let tmp = tempfile::tempdir().unwrap();
    let backbone = tmp.path().join("backbone");
    collm_llm::testing::write_tiny_backbone(&backbone, 1).unwrap();
    let out = tmp.path().join("qs");
    let r = quickstart(&options(&out, &backbone)).unwrap();
    for f in ["report.md", "warm_cold.png", "curves.png"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    for (name, rep) in [
        ("MF", &r.mf),
        ("TALLRec", &r.tallrec),
        ("CoLLM-MF", &r.collm_mf),
    ] {
        assert!(rep.n > 0 && rep.auc.is_some(), "{name}");
        assert!(r.table.contains(name), "{}", r.table);
    }
    // The same numbers from evaluate_run, for a CF run (needs --data) and a CoLLM run.
    let mf = evaluate_run(&out.join("mf"), Some(&out.join("data")), "test", false).unwrap();
    assert_eq!(mf.kind, RunKind::Cf);
    assert_eq!(mf.report.auc, r.mf.auc);
    assert!(evaluate_run(&out.join("mf"), None, "test", false).is_err());
    let c = evaluate_run(&out.join("collm-mf"), None, "test", false).unwrap();
    assert_eq!(c.kind, RunKind::Collm);
    assert_eq!(c.report.auc, r.collm_mf.auc);
    assert_eq!(c.scores.len(), r.collm_mf.n);
    // A report over runs of both kinds: the table and its files.
    let rep = tmp.path().join("report");
    let data = out.join("data");
    let runs = [out.join("mf"), out.join("collm-mf")];
    let md = report(&runs, Some(&data), "valid", Some(&rep), Scores::Shipped).unwrap();
    assert!(
        md.contains("| mf |") && md.contains("| collm-mf |") && md.contains("RelaImpr"),
        "{md}"
    );
    for f in ["report.md", "warm_cold.png", "curves.png"] {
        assert!(rep.join(f).is_file(), "{f}");
    }
    // Runs that ship the scores of their evaluation and not their weights (as the ML-1M table's
    // rows may): the same table from the scores, none without them.
    let shipped = tmp.path().join("shipped");
    let mut copies = Vec::new();
    for run in &runs {
        let copy = shipped.join(run.file_name().unwrap());
        copy_dir(run, &copy);
        let e = evaluate_run(run, Some(&data), "valid", false).unwrap();
        let rows = &e.dataset.split("valid").unwrap().rows;
        collm_core::io::write_text_atomic(
            &copy.join("scores-valid.tsv.gz"),
            &collm_metrics::scores::format_scores(rows, &e.scores),
        )
        .unwrap();
        remove_weights(&copy);
        copies.push(copy);
    }
    assert_eq!(
        report(&copies, Some(&data), "valid", None, Scores::Shipped).unwrap(),
        md
    );
    let err = report(&copies, Some(&data), "valid", None, Scores::Evaluate).unwrap_err();
    assert!(format!("{err:#}").contains("not found"), "{err:#}");
    // A CF run's scores still need its dataset; a scores file of other rows is refused, by name.
    assert!(report(&copies, None, "valid", None, Scores::Shipped).is_err());
    let bad = copies[1].join("scores-valid.tsv.gz");
    std::fs::write(&bad, "uid\tiid\tscore\n0\t0\t0.5\n").unwrap();
    let err = report(&copies, Some(&data), "valid", None, Scores::Shipped).unwrap_err();
    assert!(
        format!("{err:#}").contains("scores-valid.tsv.gz"),
        "{err:#}"
    );
    // Run again into the same directory: the runs are replaced, the numbers repeat.
    let again = quickstart(&options(&out, &backbone)).unwrap();
    assert_eq!(again.collm_mf.auc, r.collm_mf.auc);
}

#[test]
fn compacted_runs_load_with_half_the_bytes_and_nearly_the_same_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let backbone = tmp.path().join("backbone");
    collm_llm::testing::write_tiny_backbone(&backbone, 1).unwrap();
    let out = tmp.path().join("qs");
    quickstart(&options(&out, &backbone)).unwrap();
    let data = out.join("data");
    let before_c = evaluate_run(&out.join("collm-mf"), None, "test", false).unwrap();
    let before_mf = evaluate_run(&out.join("mf"), Some(&data), "test", false).unwrap();

    // The CoLLM run: every best/ file halves, the manifest follows, the run still loads.
    let done = |c: Compaction| match c {
        Compaction::Done(files) => files,
        other => panic!("expected a compaction: {other:?}"),
    };
    let files = done(compact(&out.join("collm-mf"), candle_core::DType::F16).unwrap());
    assert!(!files.is_empty());
    for f in &files {
        assert!(f.stats.bytes_after < f.stats.bytes_before * 6 / 10, "{f:?}");
        assert!(
            f.stats.max_rel_change > 0.0 && f.stats.max_rel_change < 1e-3,
            "{f:?}"
        );
    }
    let after_c = evaluate_run(&out.join("collm-mf"), None, "test", false).unwrap();
    assert_eq!(after_c.scores.len(), before_c.scores.len());
    let moved = before_c
        .scores
        .iter()
        .zip(&after_c.scores)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    assert!(moved > 0.0 && moved < 1e-2, "scores moved by {moved}");
    // Nothing half-written is left beside the weights.
    let leftovers: Vec<_> = walk(&out.join("collm-mf").join("best"))
        .into_iter()
        .filter(|p| {
            !p.ends_with("weights.sha256.json")
                && p.extension()
                    .is_none_or(|e| e != "safetensors" && e != "json")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Again, in f16 or bf16: already half, nothing changes (f16 to bf16 would only lose bits).
    for d in [candle_core::DType::F16, candle_core::DType::BF16] {
        match compact(&out.join("collm-mf"), d).unwrap() {
            Compaction::AlreadyHalf(h) => assert_eq!(h, candle_core::DType::F16),
            other => panic!("{d:?}: {other:?}"),
        }
    }
    let after_again = evaluate_run(&out.join("collm-mf"), None, "test", false).unwrap();
    assert_eq!(after_again.scores, after_c.scores);

    // The collaborative run in bf16: it loads and scores nearly as before; the CoLLM run over
    // it now refuses to load, naming the CF run (the hash it recorded changed).
    let files = done(compact(&out.join("mf"), candle_core::DType::BF16).unwrap());
    assert_eq!(files.len(), 1);
    let after_mf = evaluate_run(&out.join("mf"), Some(&data), "test", false).unwrap();
    let d = (after_mf.report.auc.unwrap() - before_mf.report.auc.unwrap()).abs();
    assert!(d < 0.02, "MF AUC moved by {d}");
    let err = evaluate_run(&out.join("collm-mf"), None, "test", false)
        .err()
        .expect("the CF run under it changed");
    assert!(format!("{err:#}").contains("CF run"), "{err:#}");
}

#[test]
fn a_weight_out_of_f16_range_is_refused_and_the_file_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("w.safetensors");
    let t = candle_core::Tensor::new(&[1.0f32, 1e6, -3.0], &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("w".to_string(), t)].into_iter().collect(), &p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let err = collm_nn::params::compact_file(&p, candle_core::DType::F16, &p).unwrap_err();
    assert!(format!("{err:#}").contains("does not fit"), "{err:#}");
    assert_eq!(std::fs::read(&p).unwrap(), bytes);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    // bf16 has f32's range: the same file compacts.
    let c = collm_nn::params::compact_file(&p, candle_core::DType::BF16, &p).unwrap();
    assert!(c.bytes_after < c.bytes_before);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Removes every weights file (`*.safetensors`) under `dir`.
fn remove_weights(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            remove_weights(&p);
        } else if p.extension().is_some_and(|x| x == "safetensors") {
            std::fs::remove_file(p).unwrap();
        }
    }
}
