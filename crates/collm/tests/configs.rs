//! Every committed run config loads and validates: the ML-1M table's rows
//! (`scripts/ml1m_table.sh`) start from these files, and a typo there would surface only hours
//! into a session.

use collm::experiment::{ExperimentConfig, Mode};
use std::path::Path;

#[test]
fn every_ml1m_config_loads_and_names_the_runs_it_reads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/ml-1m");
    let mut llm = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue; // `rows`: the driver's row table
        }
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if name.starts_with("cf-") {
            collm_cf::CfConfig::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            continue;
        }
        if name == "ctrl" {
            let c = collm::ctrl::CtrlConfig::load(&p)
                .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            // The table's DIN, aligned.
            let din = collm_cf::CfConfig::load(&dir.join("cf-din.toml")).unwrap();
            assert_eq!(c.cf, din, "ctrl's [cf] is the table's DIN");
            continue;
        }
        let c = ExperimentConfig::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        llm += 1;
        // The table's rows read shipped runs, never a user's runs/.
        for r in [&c.model.cf_run, &c.model.step1].into_iter().flatten() {
            assert!(r.starts_with("results/ml-1m"), "{name}: {}", r.display());
        }
        if let Some(stem) = name.strip_suffix("-tallrec-long") {
            // A row beyond the paper's: its `-long` row over the one-epoch step 1, nothing else.
            let b = ExperimentConfig::load(&dir.join(format!("{stem}-long.toml"))).unwrap();
            let mut same = c.clone();
            same.name = b.name.clone();
            assert_eq!(
                same.model.step1.as_deref(),
                Some(Path::new("results/ml-1m/tallrec-long")),
                "{name}"
            );
            same.model.step1 = b.model.step1.clone();
            assert_eq!(
                same, b,
                "{name} differs from {stem}-long in more than step1"
            );
            continue;
        }
        if c.mode.needs_step1() {
            assert_eq!(
                c.model.step1.as_deref(),
                Some(Path::new("results/ml-1m/tallrec")),
                "{name}"
            );
        }
        if let Some(base) = name.strip_suffix("-long") {
            // A row beyond the paper's: its base row with a larger step budget, nothing else.
            let b = ExperimentConfig::load(&dir.join(format!("{base}.toml"))).unwrap();
            assert!(c.training.max_steps > b.training.max_steps, "{name}");
            let mut same = c.clone();
            same.name = b.name.clone();
            same.training.max_steps = b.training.max_steps;
            assert_eq!(same, b, "{name} differs from {base} in more than max_steps");
        } else if c.mode != Mode::Icl {
            let t = &c.training;
            assert_eq!(
                (t.max_steps, t.batch_size, t.eval_every),
                (600, 16, 200),
                "{name}: the table's budget"
            );
        }
    }
    assert!(llm >= 11, "{llm} LLM configs");
}
