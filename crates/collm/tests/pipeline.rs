//! The library's jobs end to end on tiny data with a tiny backbone: the quickstart writes its
//! runs, report and charts, and `evaluate_run` evaluates runs of both kinds.

use collm::pipeline::{evaluate_run, quickstart, QuickstartOptions};
use collm_data::sources::synthetic::SyntheticOptions;
use collm_metrics::RunKind;

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
    let md = collm::pipeline::report(
        &[out.join("mf"), out.join("collm-mf")],
        Some(&out.join("data")),
        "valid",
        Some(&rep),
    )
    .unwrap();
    assert!(
        md.contains("| mf |") && md.contains("| collm-mf |") && md.contains("RelaImpr"),
        "{md}"
    );
    for f in ["report.md", "warm_cold.png", "curves.png"] {
        assert!(rep.join(f).is_file(), "{f}");
    }
    // Run again into the same directory: the runs are replaced, the numbers repeat.
    let again = quickstart(&options(&out, &backbone)).unwrap();
    assert_eq!(again.collm_mf.auc, r.collm_mf.auc);
}
