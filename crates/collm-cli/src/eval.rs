//! `collm eval …`: AUC and UAUC, overall and on the warm/cold subsets.

use anyhow::Result;
use clap::{Args, Subcommand};
use collm_data::Dataset;
use collm_metrics::{scores::read_scores, Report};
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
    /// Evaluate a CoLLM run (from `collm train collm`) on a split of its dataset.
    Collm(CollmEvalArgs),
}

#[derive(Args)]
pub struct CollmEvalArgs {
    /// Run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// Split name (train, valid, test).
    #[arg(long)]
    pub split: String,
    /// Also write the scores (uid iid score) to this file.
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
    /// Dataset directory (must be the one the run was trained on).
    #[arg(long)]
    pub data: PathBuf,
    /// Split name (train, valid, test).
    #[arg(long)]
    pub split: String,
    /// Also write the scores (uid iid score) to this file.
    #[arg(long)]
    pub scores_out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ScoresArgs {
    /// Dataset directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Split name (train, valid, test).
    #[arg(long)]
    pub split: String,
    /// Scores file.
    #[arg(long)]
    pub scores: PathBuf,
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
    match cmd {
        EvalCommand::Scores(a) => {
            let ds = Dataset::load(&a.data)?;
            let rows = &ds.split(&a.split)?.rows;
            let scores = read_scores(&a.scores, rows)?;
            let report = Report::for_split(&ds, &a.split, &scores)?;
            print_report(&report, a.json)
        }
        EvalCommand::Collm(a) => {
            let (report, scores) = collm::train::evaluate(&a.run, &a.split, !a.json)?;
            if let Some(path) = &a.scores_out {
                let rf = collm::train::load_run_file(&a.run)?;
                let ds = Dataset::load(&rf.experiment.data)?;
                collm_data::io::write_file_atomic(
                    path,
                    collm_metrics::scores::format_scores(&ds.split(&a.split)?.rows, &scores)
                        .as_bytes(),
                )?;
            }
            print_report(&report, a.json)
        }
        EvalCommand::Cf(a) => {
            let ds = Dataset::load(&a.data)?;
            let device = candle_core::Device::Cpu;
            let (cfg, model) = collm_cf::run::load_model(&a.run, &ds, &device)?;
            let rows = &ds.split(&a.split)?.rows;
            let scores =
                collm_cf::train::predict(model.as_ref(), rows, cfg.cf.eval_batch_size, &device)?;
            if let Some(path) = &a.scores_out {
                collm_data::io::write_file_atomic(
                    path,
                    collm_metrics::scores::format_scores(rows, &scores).as_bytes(),
                )?;
            }
            let report = Report::for_split(&ds, &a.split, &scores)?;
            print_report(&report, a.json)
        }
    }
}
