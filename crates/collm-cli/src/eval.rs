//! `collm eval …`: AUC and UAUC, overall and on the warm/cold subsets.

use anyhow::Result;
use clap::{Args, Subcommand};
use collm::pipeline::evaluate_run;
use collm_data::subsets::TrainCounts;
use collm_data::Dataset;
use collm_metrics::compare::compare;
use collm_metrics::scores::{format_scores, read_scores};
use collm_metrics::Report;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Evaluate a scores file (header `uid iid score`, one line per row of the split, in the
    /// split's order). AUC equals scikit-learn's roc_auc_score; UAUC is the unweighted mean
    /// of per-user AUC over users with >= 2 rows and both labels (the reference's uAUC_me).
    /// Subsets: warm/cold (>= 3 train rows for user and item, the paper), warm4/cold4 (>= 4,
    /// the reference code), seen/unseen (both in train or not).
    Scores(ScoresArgs),
    /// Evaluate a collaborative-model run (from `collm train cf`) on a split of the dataset it
    /// was trained on.
    Cf(CfEvalArgs),
    /// Evaluate a CoLLM run (from `collm train collm`) on a split of its dataset (or of --data:
    /// the same data with a test split added).
    Collm(CollmEvalArgs),
    /// Is scores file A above scores file B on the same split, beyond noise? AUC and UAUC of
    /// both, overall and warm/cold, with the difference's 95% interval and P(A<=B) from the
    /// paired bootstrap over users (each resample draws the split's users with replacement,
    /// with all their rows, and measures A and B on the same draw).
    Compare(CompareArgs),
}

/// The split a scores file belongs to.
#[derive(Args)]
pub struct SplitArgs {
    /// Dataset directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Split name (train, valid, test).
    #[arg(long)]
    pub split: String,
}

#[derive(Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub on: SplitArgs,
    /// Scores file A (the candidate), as `collm eval scores` reads it.
    #[arg(long)]
    pub scores: PathBuf,
    /// Scores file B (the baseline) of the same split.
    #[arg(long)]
    pub baseline: PathBuf,
    /// Bootstrap resamples.
    #[arg(long, default_value_t = 2000)]
    pub resamples: usize,
    /// Seed of the resampling (the same seed, the same interval).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print {"resamples","seed","level","n","users","differences":[{"rows","metric","a","b",
    /// "diff","ci_low","ci_high","se","p_not_above","resamples_defined"},…]}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CollmEvalArgs {
    /// Run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// Evaluate on this dataset instead of the one the run recorded: it must hold the run's
    /// items, train and valid splits (a test split may be added or differ); the split that
    /// differs otherwise is named.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Split name (train, valid, test).
    #[arg(long)]
    pub split: String,
    /// Also write the scores (uid iid score, as `collm eval scores` reads them) to this file,
    /// gzip-compressed where its name ends in .gz.
    #[arg(long)]
    pub scores_out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CfEvalArgs {
    /// Run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// Dataset directory: the one the run was trained on, or the same items, train and valid
    /// splits with a test split added or replaced (the split that differs otherwise is named).
    #[arg(long)]
    pub data: PathBuf,
    /// Split name (train, valid, test).
    #[arg(long)]
    pub split: String,
    /// Also write the scores (uid iid score, as `collm eval scores` reads them) to this file,
    /// gzip-compressed where its name ends in .gz.
    #[arg(long)]
    pub scores_out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ScoresArgs {
    #[command(flatten)]
    pub on: SplitArgs,
    /// Scores file (gzip-compressed or not, whatever its name).
    #[arg(long)]
    pub scores: PathBuf,
    /// Also write the scores read to this file as collm writes scores (an f32 score with the
    /// shortest digits that read back to it: the same metrics in fewer bytes), gzip-compressed
    /// where its name ends in .gz.
    #[arg(long)]
    pub scores_out: Option<PathBuf>,
    /// Print {"auc","uauc","n","uauc_users","subsets":{"warm":{…},…}}.
    #[arg(long)]
    pub json: bool,
}

/// Prints a report as JSON or as a table: every `collm eval` command ends here.
pub fn print_report(report: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    let (e, scores_out, json) = match cmd {
        EvalCommand::Scores(a) => {
            let ds = Dataset::load(&a.on.data)?;
            let rows = &ds.split(&a.on.split)?.rows;
            let scores = read_scores(&a.scores, rows)?;
            if let Some(path) = &a.scores_out {
                collm_core::io::write_text_atomic(path, &format_scores(rows, &scores))?;
            }
            return print_report(&Report::for_split(&ds, &a.on.split, &scores)?, a.json);
        }
        EvalCommand::Compare(a) => {
            let ds = Dataset::load(&a.on.data)?;
            let rows = &ds.split(&a.on.split)?.rows;
            let (sa, sb) = (
                read_scores(&a.scores, rows)?,
                read_scores(&a.baseline, rows)?,
            );
            let counts = TrainCounts::from_dataset(&ds)?;
            let c = compare(&counts, rows, &sa, &sb, a.resamples, a.seed)?;
            if a.json {
                println!("{}", serde_json::to_string(&c)?);
            } else {
                print!(
                    "{}",
                    c.render(
                        &a.scores.display().to_string(),
                        &a.baseline.display().to_string()
                    )
                );
            }
            return Ok(());
        }
        EvalCommand::Collm(a) => (
            evaluate_run(&a.run, a.data.as_deref(), &a.split, !a.json)?,
            a.scores_out,
            a.json,
        ),
        EvalCommand::Cf(a) => (
            evaluate_run(&a.run, Some(&a.data), &a.split, false)?,
            a.scores_out,
            a.json,
        ),
    };
    if let Some(path) = &scores_out {
        let rows = &e.dataset.split(&e.split)?.rows;
        collm_core::io::write_text_atomic(path, &format_scores(rows, &e.scores))?;
    }
    print_report(&e.report, json)
}
