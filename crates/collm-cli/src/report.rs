//! `collm report RUN…`: a Table-2-style markdown table of runs evaluated on one split, and with
//! `--out DIR` the table, the warm/cold AUC bars (Figure 3) and the validation curves as files.

use anyhow::Result;
use clap::Args;
use collm::pipeline::report;
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
    let md = report(&a.runs, a.data.as_deref(), &a.split, a.out.as_deref())?;
    print!("{md}");
    if let Some(out) = &a.out {
        eprintln!(
            "wrote {}/{{report.md, warm_cold.png, curves.png}}",
            out.display()
        );
    }
    Ok(())
}
