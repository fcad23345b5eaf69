//! `collm report RUN…`: a Table-2-style markdown table of runs evaluated on one split, and with
//! `--out DIR` the table, the warm/cold AUC bars (Figure 3) and the validation curves as files.

use anyhow::Result;
use clap::Args;
use collm::pipeline::evaluate_run;
use collm_report::{plot, run_curve, table, Row};
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
        let report = evaluate_run(run, a.data.as_deref(), &a.split, true)?.report;
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
