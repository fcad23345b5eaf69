//! Training a collaborative model: pointwise BCE on the explicit labels, Adam with L2 weight
//! decay, shuffled mini-batches, the full valid split evaluated after every epoch, early
//! stopping on valid AUC with patience, the best weights kept. Every epoch also writes a
//! checkpoint, so a killed run resumes (`resume`) where it stopped, with identical results:
//! each epoch's shuffling and dropout come from an RNG seeded by (seed, epoch).

use crate::nn::bce_with_logits;
use crate::optim::{Adam, Decay};
use crate::run::{DataRef, RunConfig, CONFIG_FILE, METRICS_FILE, MODEL_FILE};
use crate::{build_model, CfBatch, CfConfig, CollaborativeModel, TrainCtx};
use anyhow::{bail, Result};
use candle_core::Device;
use collm_core::progress::Progress;
use collm_data::subsets::TrainCounts;
use collm_data::{Dataset, Interaction};
use collm_metrics::{Report, RunKind};
use collm_nn::run::{epoch_seed, OpenMode, RunDir};
use collm_nn::scaffold::{drive, progress_bar, Between, LoopState, Trainer, Validation};
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub valid_auc: Option<f64>,
    pub valid_uauc: Option<f64>,
    pub seconds: f64,
    pub samples_per_second: f64,
}

/// `metrics.json`, also the loop state kept in the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainMetrics {
    /// Always `cf` (absent in files written before it was recorded).
    #[serde(default = "cf_kind")]
    pub kind: RunKind,
    pub curve: Vec<EpochRecord>,
    pub best_epoch: Option<usize>,
    pub best_valid: Option<Report>,
    pub epochs_without_improvement: usize,
    /// Why training ended: "patience", "max_epochs", or null while running.
    pub stopped: Option<String>,
}

fn cf_kind() -> RunKind {
    RunKind::Cf
}

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue a run from its last checkpoint.
    pub resume: bool,
    /// Replace the run `out` holds.
    pub force: bool,
    /// Hide the progress bar.
    pub quiet: bool,
    /// Start from these weights (a safetensors file of some of the model's parameters; the
    /// others initialised fresh) instead of a fresh model: CTRL's stage 2.
    pub init: Option<(String, std::path::PathBuf)>,
}

impl TrainOptions {
    pub fn mode(&self) -> Result<OpenMode> {
        OpenMode::from_flags(self.resume, self.force)
    }
}

/// Scores (logits) of a model on rows, in order.
pub fn predict(
    model: &dyn CollaborativeModel,
    rows: &[Interaction],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch_size.max(1)) {
        collm_core::progress::check()?;
        let refs: Vec<&Interaction> = chunk.iter().collect();
        let b = CfBatch::new(&refs, model.history_len(), device)?;
        let s = model.forward(&b, None)?.score.to_vec1::<f32>()?;
        out.extend(s.into_iter().map(f64::from));
    }
    Ok(out)
}

/// Builds the optimizer the training loop uses: Adam with L2 weight decay on every parameter
/// (torch.optim.Adam, as the reference trains its collaborative models).
pub fn optimizer(model: &dyn CollaborativeModel, cfg: &CfConfig) -> Result<Adam> {
    let params: Vec<_> = model
        .params()
        .trainable()
        .into_iter()
        .map(|(n, v)| (n, v, cfg.weight_decay))
        .collect();
    Adam::new(params, cfg.lr, Decay::L2)
}

/// One pass over the train rows (0-based `epoch`): shuffled mini-batches, BCE, one Adam step
/// each. The shuffling and dropout come from (seed, epoch), so a resumed run repeats them.
/// Returns the mean batch loss.
pub fn train_epoch(
    model: &dyn CollaborativeModel,
    opt: &mut Adam,
    train_rows: &[Interaction],
    cfg: &CfConfig,
    epoch: usize,
    device: &Device,
) -> Result<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(epoch_seed(cfg.seed, epoch));
    let mut order: Vec<usize> = (0..train_rows.len()).collect();
    order.shuffle(&mut rng);
    let ctx = TrainCtx::new(rng.gen());
    let (mut loss_sum, mut batches) = (0.0, 0usize);
    for chunk in order.chunks(cfg.batch_size) {
        collm_core::progress::check()?;
        let rows: Vec<&Interaction> = chunk.iter().map(|&k| &train_rows[k]).collect();
        let b = CfBatch::new(&rows, model.history_len(), device)?;
        let out = model.forward(&b, Some(&ctx))?;
        let loss = bce_with_logits(&out.score, &b.labels)?;
        let l = loss.to_scalar::<f32>()? as f64;
        if !l.is_finite() {
            bail!(
                "epoch {}: the training loss is {l}; lower the learning rate",
                epoch + 1
            );
        }
        opt.step(&loss.backward()?)?;
        loss_sum += l;
        batches += 1;
    }
    Ok(loss_sum / batches.max(1) as f64)
}

/// Refuses a model whose embedding tables cannot fit in this machine's memory: the user and
/// item tables in f32, four times over (weights, gradients, Adam's two moments), against
/// MemAvailable. (`dim = 100000000` on ML-1M asks ~6 TB; it used to grow until stopped.)
fn check_fits(cfg: &CfConfig, ds: &Dataset) -> Result<()> {
    let rows = (ds.num_users() + ds.num_items()) as f64;
    let need = rows * cfg.dim as f64 * 4.0 * 4.0;
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kb| kb * 1024.0);
    if let Some(avail) = available {
        if need > avail {
            bail!(
                "dim = {}: the embedding tables alone need about {:.1} GB ({} users and items x {} x 4 bytes x 4 for weights, gradients and Adam), this machine has {:.1} GB available: choose a smaller dim",
                cfg.dim,
                need / 1e9,
                rows as u64,
                cfg.dim,
                avail / 1e9
            );
        }
    }
    Ok(())
}

/// Trains `cfg` on `ds` into the run directory `out`.
pub fn train(
    cfg: &CfConfig,
    ds: &Dataset,
    out: &Path,
    opts: &TrainOptions,
) -> Result<TrainMetrics> {
    cfg.validate()?;
    check_fits(cfg, ds)?;
    let device = Device::Cpu;
    let init = match &opts.init {
        Some((what, p)) => Some(crate::run::InitRef {
            what: what.clone(),
            path: p.display().to_string(),
            sha256: collm_core::io::sha256_file(p)?,
        }),
        None => None,
    };
    let run_cfg = RunConfig {
        cf: cfg.clone(),
        data: DataRef::of(ds),
        init,
    };
    let mut run = RunDir::open(out, opts.mode()?, CONFIG_FILE)?;
    if opts.resume {
        let old = RunConfig::load(out)?;
        old.data.check(ds, &format!("run {}", out.display()))?;
        if old.init.as_ref().map(|i| &i.sha256) != run_cfg.init.as_ref().map(|i| &i.sha256) {
            bail!(
                "{}: the run started from other weights than these ({:?}); resume with the same ones",
                out.display(),
                old.init.map(|i| i.path)
            );
        }
        if old.cf != *cfg {
            bail!(
                "{}: the config differs from the run's {CONFIG_FILE} ({}); resume with the same settings",
                out.display(),
                collm_core::fields::differences(&old.cf, cfg).join("; ")
            );
        }
    }
    run_cfg.save(run.path())?;

    let model = build_model(cfg, ds, &device)?;
    if let Some((_, p)) = &opts.init {
        // (A resumed run then restores every parameter from its checkpoint.)
        let loaded = model.params().load_some(p)?;
        tracing::info!("started from {} ({} tensors)", p.display(), loaded.len());
    }
    let opt = optimizer(model.as_ref(), cfg)?;
    let fresh = TrainMetrics {
        kind: RunKind::Cf,
        curve: Vec::new(),
        best_epoch: None,
        best_valid: None,
        epochs_without_improvement: 0,
        stopped: None,
    };
    let train_rows = &ds.train()?.rows;
    let pb = progress_bar(
        cfg.max_epochs,
        "epoch",
        format!("train {}", cfg.model),
        opts.quiet,
    );
    let mut trainer = CfTrainer {
        cfg,
        model,
        opt,
        train_rows,
        valid_rows: &ds.split("valid")?.rows,
        counts: TrainCounts::from_rows(train_rows),
        device,
        pb,
        last_loss: f64::NAN,
        last_report: None,
    };
    let metrics = drive(&mut trainer, &mut run, fresh, METRICS_FILE, None, None)?;
    trainer.pb.finish_and_clear();
    run.finish()?;
    Ok(metrics)
}

impl LoopState for TrainMetrics {
    fn best_auc(&self) -> Option<f64> {
        self.best_valid.as_ref().and_then(|b| b.auc)
    }
    fn without_improvement(&mut self) -> &mut usize {
        &mut self.epochs_without_improvement
    }
    fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }
    fn set_stopped(&mut self, why: &str) {
        self.stopped = Some(why.into());
    }
}

/// A collaborative model's side of the scaffold: an interval is one epoch.
struct CfTrainer<'a> {
    cfg: &'a CfConfig,
    model: Box<dyn CollaborativeModel>,
    opt: Adam,
    train_rows: &'a [Interaction],
    valid_rows: &'a [Interaction],
    counts: TrainCounts,
    device: Device,
    pb: Progress,
    last_loss: f64,
    last_report: Option<Report>,
}

impl Trainer for CfTrainer<'_> {
    type State = TrainMetrics;

    fn restore(&mut self, ckpt: &Path) -> Result<()> {
        self.model.params().load(&ckpt.join("last.safetensors"))?;
        self.opt.load(&ckpt.join("optimizer.safetensors"))
    }

    fn start(&mut self, state: &mut TrainMetrics) -> Result<()> {
        self.pb.set_position(state.curve.len() as u64);
        Ok(())
    }

    /// An epoch (seconds to a few minutes on ML-1M): checkpoints come at its end only.
    fn interval(&mut self, state: &mut TrainMetrics, _: &mut Between) -> Result<Validation> {
        let epoch = state.curve.len();
        let t = Instant::now();
        let (model, cfg) = (self.model.as_ref(), self.cfg);
        let train_loss = train_epoch(
            model,
            &mut self.opt,
            self.train_rows,
            cfg,
            epoch,
            &self.device,
        )?;
        let train_s = t.elapsed().as_secs_f64();
        // A stop asked for mid-validation comes after the epoch's checkpoint.
        let scores = collm_core::progress::defer_interrupts(|| {
            predict(model, self.valid_rows, cfg.eval_batch_size, &self.device)
        })?;
        let report = Report::compute(&self.counts, self.valid_rows, &scores)?;
        state.curve.push(EpochRecord {
            epoch: epoch + 1,
            train_loss,
            valid_auc: report.auc,
            valid_uauc: report.uauc,
            seconds: t.elapsed().as_secs_f64(),
            samples_per_second: self.train_rows.len() as f64 / train_s,
        });
        self.last_loss = train_loss;
        tracing::debug!(epoch = epoch + 1, auc = ?report.auc, "epoch done");
        let auc = report.auc;
        self.last_report = Some(report);
        Ok(Validation { auc })
    }

    fn keep_best(&mut self, state: &mut TrainMetrics, run: &Path) -> Result<()> {
        self.model.params().save(&run.join(MODEL_FILE))?;
        crate::run::write_weights_manifest(run)?;
        state.best_epoch = Some(state.curve.len());
        state.best_valid = self.last_report.clone();
        Ok(())
    }

    fn budget_spent(&self, state: &TrainMetrics) -> Option<&'static str> {
        (state.curve.len() >= self.cfg.max_epochs).then_some("max_epochs")
    }

    fn patience(&self) -> usize {
        self.cfg.patience
    }

    fn checkpoint(&self, dir: &Path) -> Result<()> {
        self.model.params().save(&dir.join("last.safetensors"))?;
        self.opt.save(&dir.join("optimizer.safetensors"))
    }

    fn validated(&mut self, state: &TrainMetrics, v: &Validation) {
        // The interrupt is seen by the next batch (train_epoch, predict).
        let _ = self.pb.inc(1);
        self.pb.set_message(format!(
            "loss {:.4} valid auc {:.4} (best {:.4} @ {})",
            self.last_loss,
            v.auc.unwrap_or(f64::NAN),
            state.best_auc().unwrap_or(f64::NAN),
            state.best_epoch.unwrap_or(0)
        ));
    }
}
