//! `collm report RUN…`: a Table-2-style markdown table of runs on one split (from the scores
//! their evaluation left beside them, or evaluated), and with `--out DIR` the table, the
//! warm/cold AUC bars (Figure 3) and the validation curves as files.

use anyhow::Result;
use clap::Args;
use collm::pipeline::{report, Scores};
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
    /// Evaluate every run again. Without it a run that holds the scores of an evaluation on the
    /// split (RUN/scores-SPLIT.tsv.gz or .tsv, as `collm eval … --scores-out` writes them; the
    /// ML-1M table's rows ship theirs) is reported from them, in seconds and without its
    /// weights; the others are evaluated.
    #[arg(long)]
    pub rescore: bool,
}

pub fn run(a: ReportArgs) -> Result<()> {
    let scores = if a.rescore {
        Scores::Evaluate
    } else {
        Scores::Shipped
    };
    let md = report(
        &a.runs,
        a.data.as_deref(),
        &a.split,
        a.out.as_deref(),
        scores,
    )?;
    print!("{md}");
    if let Some(out) = &a.out {
        eprintln!(
            "wrote {}/{{report.md, warm_cold.png, curves.png}}",
            out.display()
        );
    }
    Ok(())
}
