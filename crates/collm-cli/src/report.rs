//! `collm report RUN…`: a Table-2-style markdown table of runs evaluated on one split.

use anyhow::Result;
use clap::Args;
use collm::report::{table, Row};
use collm_data::Dataset;
use collm_metrics::Report;
use std::path::PathBuf;

#[derive(Args)]
pub struct ReportArgs {
    /// Run directories: CoLLM runs (`collm train collm`) or collaborative-model runs
    /// (`collm train cf`, which then need --data). The last one is compared with the best of
    /// the others (relative improvement, as the paper's RelaImpr).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Split to evaluate.
    #[arg(long, default_value = "valid")]
    pub split: String,
    /// Dataset of the collaborative-model runs.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Also write the table to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: ReportArgs) -> Result<()> {
    let mut rows = Vec::new();
    for run in &a.runs {
        let name = run
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| run.display().to_string());
        // A CoLLM run's config.toml holds an [experiment]; a CF run's holds [cf].
        let report = if collm::train::load_run_file(run).is_ok() {
            collm::train::evaluate(run, &a.split, true)?.0
        } else {
            let data = a.data.as_ref().ok_or_else(|| {
                anyhow::anyhow!("{}: a collaborative-model run needs --data", run.display())
            })?;
            let ds = Dataset::load(data)?;
            let device = candle_core::Device::Cpu;
            let (cfg, model) = collm_cf::run::load_model(run, &ds, &device)?;
            let rows = &ds.split(&a.split)?.rows;
            let scores =
                collm_cf::train::predict(model.as_ref(), rows, cfg.cf.eval_batch_size, &device)?;
            Report::for_split(&ds, &a.split, &scores)?
        };
        rows.push(Row { name, report });
    }
    let md = table(&rows, &["warm", "cold", "warm4", "cold4", "seen", "unseen"]);
    print!("{md}");
    if let Some(out) = &a.out {
        collm_data::io::write_file_atomic(out, md.as_bytes())?;
    }
    Ok(())
}
