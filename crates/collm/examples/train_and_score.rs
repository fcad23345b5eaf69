//! Training and scoring through the library, without the binary: a synthetic dataset, MF,
//! CoLLM's step 1 (TALLRec) and step 2 (the CIE mapper over MF), each evaluated on the test
//! split.
//!
//! ```text
//! cargo run --release -p collm --example train_and_score [BACKBONE] [OUT]
//! ```
//! BACKBONE defaults to the quickstart's SmolLM2 GGUF when it has been fetched
//! (scripts/fetch_smollm2.sh), else a tiny random model is written (fast, learns nothing).

use anyhow::Result;
use collm::experiment::{ExperimentConfig, Mode};
use collm::pipeline::evaluate_run;
use collm::train::{train, TrainOptions};
use collm_cf::train::{train as train_cf, TrainOptions as CfOptions};
use collm_cf::{CfConfig, ModelKind};
use collm_data::dataset::write_dataset;
use collm_data::sources::synthetic::{prepare, SyntheticOptions};
use std::path::PathBuf;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let backbone = args.next().filter(|s| !s.is_empty()).map(PathBuf::from);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "runs/example".into()));
    std::fs::create_dir_all(&out)?;
    let backbone = match backbone {
        Some(b) => b,
        None if PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf").is_file() => {
            PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
        None => {
            let tiny = out.join("tiny-backbone");
            collm_llm::testing::write_tiny_backbone(&tiny, 1)?;
            tiny
        }
    };

    // Data → a collaborative model.
    let data = out.join("data");
    let options = SyntheticOptions {
        users: 60,
        items: 40,
        ..Default::default()
    };
    let ds = write_dataset(prepare(&options)?, &data, true)?;
    let replace = CfOptions {
        force: true,
        quiet: true,
        ..Default::default()
    };
    let mf = CfConfig {
        dim: 16,
        max_epochs: 30,
        ..CfConfig::defaults(ModelKind::Mf)
    };
    train_cf(&mf, &ds, &out.join("mf"), &replace)?;

    // Step 1 (LoRA on text-only prompts), then step 2 (the mapper, LoRA frozen).
    let replace = TrainOptions {
        force: true,
        quiet: true,
        ..Default::default()
    };
    let mut step1 = ExperimentConfig::new(Mode::Tallrec, &data, &backbone);
    step1.training.max_steps = 8;
    step1.training.eval_every = 8;
    step1.training.eval_rows = 50;
    step1.validate()?;
    train(&step1, &out.join("tallrec"), &replace)?;
    let mut step2 = ExperimentConfig::new(Mode::Collm, &data, &backbone);
    step2.model.cf_run = Some(out.join("mf"));
    step2.model.step1 = Some(out.join("tallrec"));
    step2.training.max_steps = 8;
    step2.training.eval_every = 8;
    step2.training.eval_rows = 50;
    step2.training.lr = 3e-2;
    step2.validate()?;
    train(&step2, &out.join("collm-mf"), &replace)?;

    for (run, data) in [
        ("mf", Some(data.as_path())),
        ("tallrec", None),
        ("collm-mf", None),
    ] {
        let e = evaluate_run(&out.join(run), data, "test", false)?;
        println!(
            "{run:>9}: test AUC {} UAUC {} ({} rows)",
            collm_metrics::fmt_metric(e.report.auc),
            collm_metrics::fmt_metric(e.report.uauc),
            e.scores.len()
        );
    }
    Ok(())
}
