//! `collm report RUN…`: a Table-2-style markdown table of runs evaluated on one split, and with
//! `--out DIR` the table, the warm/cold AUC bars (Figure 3) and the validation curves as files.

use anyhow::Result;
use clap::Args;
use collm::plot;
use collm::report::{run_curve, table, Row};
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
    /// Also write DIR/report.md (the table), DIR/warm_cold.png (Figure 3: AUC on the warm and
    /// cold subsets) and DIR/curves.png (each run's validation AUC during training).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub fn run(a: ReportArgs) -> Result<()> {
    let mut rows = Vec::new();
    let mut curves = Vec::new();
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
        curves.extend(run_curve(run, &name)?);
        rows.push(Row { name, report });
    }
    let md = table(&rows, &["warm", "cold", "warm4", "cold4", "seen", "unseen"]);
    print!("{md}");
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out)?;
        collm_data::io::write_file_atomic(&out.join("report.md"), md.as_bytes())?;
        let title = format!("AUC on the warm and cold rows of {}", a.split);
        plot::subset_bars(&out.join("warm_cold.png"), &title, &rows, &["warm", "cold"])?;
        if !curves.is_empty() {
            plot::curves(&out.join("curves.png"), &curves)?;
        }
        eprintln!(
            "wrote {}/{{report.md, warm_cold.png, curves.png}}",
            out.display()
        );
    }
    Ok(())
}
