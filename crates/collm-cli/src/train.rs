//! `collm train …`: training runs.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use collm_cf::sweep::{sweep, Grid};
use collm_cf::train::{train, TrainOptions};
use collm_cf::{CfConfig, ModelKind};
use collm_data::Dataset;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Train a collaborative model (MF, LightGCN, SASRec, DIN) with BCE on the labels, Adam,
    /// early stopping on valid AUC; the run directory keeps the config, the best weights, the
    /// curve and a checkpoint (--resume continues a killed run).
    Cf(CfTrainArgs),
    /// Grid search over lr x weight decay x dim (default: the paper's space), selecting by
    /// valid AUC; writes results.tsv, results.md and best.toml.
    CfSweep(CfSweepArgs),
    /// Train a CoLLM run from an experiment TOML (mode: tallrec = step 1, collm = step 2,
    /// t1/t2/t3, softprompt, uitoken; icl only records the config). --resume continues a
    /// killed run from its last checkpoint.
    Collm(CollmTrainArgs),
    /// Train CTRL (Li et al., 2023): DIN aligned with a frozen language model's encodings of the
    /// rows as text (contrastive, stage 1), then DIN alone with a new head on the labels (stage
    /// 2). The run is a collaborative-model run (`collm eval cf` reads it); its stage 1 is kept
    /// in RUN/ctrl/. --resume continues either stage (the text encodings are cached); --force
    /// removes the run first.
    Ctrl(CtrlTrainArgs),
    /// Grid search over CTRL's stage-1 settings (sub-spaces M x batch x epochs; an axis not
    /// given keeps the config's value), selecting by valid AUC: each point a full CTRL run under
    /// OUT/runs/ (an interrupted sweep resumes), the text encodings computed once; writes
    /// results.tsv, results.md and best.toml.
    CtrlSweep(CtrlSweepArgs),
}

#[derive(Args)]
pub struct CtrlSweepArgs {
    /// The base CTRL config (as `collm train ctrl --config`).
    #[arg(long)]
    pub config: PathBuf,
    /// Dataset directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Sweep directory (texts/, runs/, results.tsv, results.md, best.toml).
    #[arg(long)]
    pub out: PathBuf,
    /// Sub-space counts M (comma-separated; each must divide ctrl.dim).
    #[arg(long, value_delimiter = ',')]
    pub sub_spaces: Vec<usize>,
    /// Stage-1 batch sizes (the in-batch negatives).
    #[arg(long, value_delimiter = ',')]
    pub batch_sizes: Vec<usize>,
    /// Stage-1 epochs.
    #[arg(long, value_delimiter = ',')]
    pub epochs: Vec<usize>,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct CtrlTrainArgs {
    /// CTRL config (TOML): `[cf]` the collaborative model (din), `[ctrl]` backbone, dim,
    /// sub_spaces, temperature, batch_size, epochs, lr, history_titles.
    #[arg(long)]
    pub config: PathBuf,
    /// Dataset directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out.
    #[arg(long)]
    pub resume: bool,
    /// Remove the run --out holds, then train.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct CollmTrainArgs {
    /// Experiment config (TOML); a run's own config.toml is accepted too.
    #[arg(long)]
    pub config: PathBuf,
    /// Run directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Replace the run --out holds.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct CfArgs {
    /// mf, lightgcn, sasrec or din (may come from --config instead).
    #[arg(long)]
    pub model: Option<ModelKind>,
    /// Dataset directory.
    #[arg(long)]
    pub data: PathBuf,
    /// TOML config (fields of the model config; flags below override it); a run's own
    /// config.toml is accepted too.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub dim: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub max_epochs: Option<usize>,
    #[arg(long)]
    pub patience: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl CfArgs {
    fn config(&self) -> Result<CfConfig> {
        let mut cfg = match (&self.config, self.model) {
            (Some(path), _) => CfConfig::load(path)?,
            (None, Some(m)) => CfConfig::defaults(m),
            (None, None) => bail!("give --model (mf, lightgcn, sasrec, din) or --config FILE"),
        };
        if let Some(m) = self.model {
            if m != cfg.model {
                bail!("--model {m} contradicts the config's model '{}'", cfg.model);
            }
        }
        if let Some(v) = self.dim {
            cfg.dim = v;
        }
        if let Some(v) = self.lr {
            cfg.lr = v;
        }
        if let Some(v) = self.weight_decay {
            cfg.weight_decay = v;
        }
        if let Some(v) = self.batch_size {
            cfg.batch_size = v;
        }
        if let Some(v) = self.max_epochs {
            cfg.max_epochs = v;
        }
        if let Some(v) = self.patience {
            cfg.patience = v;
        }
        if let Some(v) = self.seed {
            cfg.seed = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Args)]
pub struct CfTrainArgs {
    #[command(flatten)]
    pub cf: CfArgs,
    /// Run directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Replace the run --out holds.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
}

#[derive(Args)]
pub struct CfSweepArgs {
    #[command(flatten)]
    pub cf: CfArgs,
    /// Sweep directory (runs/, results.tsv, results.md, best.toml).
    #[arg(long)]
    pub out: PathBuf,
    /// Learning rates (comma-separated; default 1e-2,1e-3,1e-4).
    #[arg(long, value_delimiter = ',')]
    pub lrs: Vec<f64>,
    /// Weight decays (default 1e-2,…,1e-7).
    #[arg(long, value_delimiter = ',')]
    pub wds: Vec<f64>,
    /// Embedding sizes (default 64,128,256).
    #[arg(long, value_delimiter = ',')]
    pub dims: Vec<usize>,
}

pub fn run(cmd: TrainCommand) -> Result<()> {
    match cmd {
        TrainCommand::Cf(a) => {
            let cfg = a.cf.config()?;
            let ds = Dataset::load(&a.cf.data)?;
            let m = train(
                &cfg,
                &ds,
                &a.out,
                &TrainOptions {
                    resume: a.resume,
                    force: a.force,
                    quiet: a.cf.quiet,
                    init: None,
                },
            )?;
            let best = m.best_valid.as_ref();
            let f = collm_metrics::fmt_metric;
            println!(
                "{}: best valid AUC {} UAUC {} at epoch {} of {} (stopped: {})",
                cfg.model,
                f(best.and_then(|r| r.auc)),
                f(best.and_then(|r| r.uauc)),
                m.best_epoch.unwrap_or(0),
                m.curve.len(),
                m.stopped.as_deref().unwrap_or("-")
            );
            Ok(())
        }
        TrainCommand::Collm(a) => {
            let cfg = collm::ExperimentConfig::load(&a.config)?;
            let st = collm::train::train(
                &cfg,
                &a.out,
                &collm::train::TrainOptions {
                    resume: a.resume,
                    force: a.force,
                    quiet: a.quiet,
                    stop_after: None,
                },
            )?;
            let best = st.best_valid.as_ref();
            let f = collm_metrics::fmt_metric;
            println!(
                "{} ({}): best valid AUC {} UAUC {} at step {} of {} (stopped: {})",
                cfg.name,
                cfg.mode.name(),
                f(best.and_then(|r| r.auc)),
                f(best.and_then(|r| r.uauc)),
                st.best_step.unwrap_or(0),
                st.step,
                st.stopped.as_deref().unwrap_or("-")
            );
            Ok(())
        }
        TrainCommand::Ctrl(a) => {
            let cfg = collm::ctrl::CtrlConfig::load(&a.config)?;
            let ds = Dataset::load(&a.data)?;
            let m = collm::ctrl::train(
                &cfg,
                &ds,
                &a.out,
                &TrainOptions {
                    resume: a.resume,
                    force: a.force,
                    quiet: a.quiet,
                    init: None,
                },
            )?;
            let best = m.best_valid.as_ref();
            let f = collm_metrics::fmt_metric;
            println!(
                "ctrl (din): best valid AUC {} UAUC {} at epoch {} of {} (stopped: {})",
                f(best.and_then(|r| r.auc)),
                f(best.and_then(|r| r.uauc)),
                m.best_epoch.unwrap_or(0),
                m.curve.len(),
                m.stopped.as_deref().unwrap_or("-")
            );
            Ok(())
        }
        TrainCommand::CtrlSweep(a) => {
            let base = collm::ctrl::CtrlConfig::load(&a.config)?;
            let ds = Dataset::load(&a.data)?;
            let grid = collm::ctrl::SweepGrid {
                sub_spaces: a.sub_spaces,
                batch_sizes: a.batch_sizes,
                epochs: a.epochs,
            };
            let points = collm::ctrl::sweep(&base, &grid, &ds, &a.out, a.quiet)?;
            print_sweep(&a.out, points.first().map(|p| p.name.as_str()))
        }
        TrainCommand::CfSweep(a) => {
            let base = a.cf.config()?;
            let ds = Dataset::load(&a.cf.data)?;
            let mut grid = Grid::default();
            if !a.lrs.is_empty() {
                grid.lrs = a.lrs.clone();
            }
            if !a.wds.is_empty() {
                grid.weight_decays = a.wds.clone();
            }
            if !a.dims.is_empty() {
                grid.dims = a.dims.clone();
            }
            let points = sweep(&base, &grid, &ds, &a.out)?;
            print_sweep(&a.out, points.first().map(|p| p.name.as_str()))
        }
    }
}

/// A finished sweep's table (`OUT/results.md`) and its best point.
fn print_sweep(out: &std::path::Path, best: Option<&str>) -> Result<()> {
    print!(
        "{}",
        std::fs::read_to_string(out.join("results.md")).unwrap_or_default()
    );
    if let Some(name) = best {
        println!(
            "best: {name} (config in {})",
            out.join("best.toml").display()
        );
    }
    Ok(())
}
