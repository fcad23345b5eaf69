//! Training a CoLLM run (step 1, step 2, the variants and the baselines); the run directory it
//! writes and loading it again are [`crate::run`].
//!
//! AdamW (decay on ≥2-D weights only), linear warm-up then cosine, global-norm clipping, a
//! NaN/inf guard (a step whose loss or gradients are not finite is skipped), gradient
//! accumulation, validation every N steps on a fixed valid subsample, early stopping on its AUC.
//! A killed run resumes from its last checkpoint with the same optimizer state and data order
//! (each epoch's order comes from (seed, epoch)).

use crate::experiment::ExperimentConfig;
use crate::model::CoLlm;
use crate::run::{
    load_groups, load_run_file, refs, save_groups, EvalPoint, RunFile, RunState, BEST_DIR,
    CONFIG_FILE, METRICS_FILE,
};
use anyhow::{bail, Result};
use candle_core::Tensor;
use collm_core::io::write_file_atomic;
use collm_data::subsets::TrainCounts;
use collm_data::{Dataset, Interaction};
use collm_metrics::Report;
use collm_nn::layers::bce_with_logits;
use collm_nn::optim::{clip_grad_norm, Adam, Decay};
use collm_nn::run::{epoch_seed, OpenMode, RunDir};
use collm_nn::scaffold::{drive, progress_bar, Between, LoopState, Trainer, Validation};
use collm_nn::TrainCtx;
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use std::path::Path;

pub(crate) fn optimizer(model: &CoLlm, cfg: &ExperimentConfig) -> Result<Adam> {
    let mut params = Vec::new();
    for (group, store) in model.trainable_stores() {
        for (name, var) in store.trainable() {
            // Decay only matrices, never biases or vectors (the reference's rule).
            let wd = if var.rank() >= 2 && !name.contains("bias") {
                cfg.training.weight_decay
            } else {
                0.0
            };
            params.push((format!("{group}.{name}"), var, wd));
        }
    }
    if params.is_empty() {
        bail!("mode '{}' has nothing to train", cfg.mode.name());
    }
    Adam::new(params, cfg.training.lr, Decay::Decoupled)
}

/// The fixed validation subsample (seeded, in split order).
pub fn valid_sample(cfg: &ExperimentConfig, valid: &[Interaction]) -> Vec<Interaction> {
    if cfg.training.eval_rows == 0 || cfg.training.eval_rows >= valid.len() {
        return valid.to_vec();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed);
    let mut idx =
        rand::seq::index::sample(&mut rng, valid.len(), cfg.training.eval_rows).into_vec();
    idx.sort_unstable();
    idx.into_iter().map(|k| valid[k].clone()).collect()
}

fn train_rows(cfg: &ExperimentConfig, train: &[Interaction]) -> Vec<Interaction> {
    match cfg.data.train_rows {
        Some(n) if n < train.len() => {
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x7a11);
            let mut idx = rand::seq::index::sample(&mut rng, train.len(), n).into_vec();
            idx.sort_unstable();
            idx.into_iter().map(|k| train[k].clone()).collect()
        }
        _ => train.to_vec(),
    }
}

pub(crate) fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(epoch_seed(seed, epoch));
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rng);
    v
}

/// The epoch's row order with batches grouped by prompt length (`length_buckets`): each window
/// of `window` batches of the shuffled order is sorted by length (stably), cut into batches,
/// and those batches are shuffled. A function of (seed, epoch) only, so a resumed run sees the
/// same batches.
pub fn bucketed_order(
    seed: u64,
    epoch: usize,
    lens: &[usize],
    batch: usize,
    window: usize,
) -> Vec<usize> {
    let base = epoch_order(seed, epoch, lens.len());
    if window <= 1 || batch == 0 {
        return base;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ 0xb0c4 ^ (epoch as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93),
    );
    let mut out = Vec::with_capacity(base.len());
    for chunk in base.chunks(batch * window) {
        let mut rows = chunk.to_vec();
        rows.sort_by_key(|&k| lens[k]);
        let mut batches: Vec<&[usize]> = rows.chunks(batch).collect();
        // A short last batch stays last (it is the epoch's remainder).
        let full = if rows.len() % batch == 0 {
            batches.len()
        } else {
            batches.len() - 1
        };
        batches[..full].shuffle(&mut rng);
        for b in batches {
            out.extend_from_slice(b);
        }
    }
    out
}

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub resume: bool,
    /// Replace the run `out` holds.
    pub force: bool,
    pub quiet: bool,
    /// Stop after this many validations of this invocation (tests of resume).
    pub stop_after: Option<usize>,
}

impl TrainOptions {
    pub fn mode(&self) -> Result<OpenMode> {
        OpenMode::from_flags(self.resume, self.force)
    }
}

/// Trains (or, for ICL, just records) a run into `out`.
pub fn train(cfg: &ExperimentConfig, out: &Path, opts: &TrainOptions) -> Result<RunState> {
    let ds = Dataset::load(&cfg.data.path)?;
    let device = device();
    let refs = refs(cfg, &ds)?;
    let run_file = RunFile {
        experiment: cfg.clone(),
        refs,
    };
    let mut run = RunDir::open(out, opts.mode()?, CONFIG_FILE)?;
    if opts.resume {
        let mut old = load_run_file(out)?;
        // Runs written before the data's per-file hashes were recorded resume as before (and
        // record them from now on).
        if old.refs.data_files_sha256.is_none() && old.refs.data_sizes.is_none() {
            old.refs.data_files_sha256 = run_file.refs.data_files_sha256.clone();
            old.refs.data_sizes = run_file.refs.data_sizes;
        }
        // How often it checkpoints is not what the run is: another value resumes.
        old.experiment.training.checkpoint_minutes =
            run_file.experiment.training.checkpoint_minutes;
        if old != run_file {
            bail!(
                "{}: the config or its inputs (data, backbone, CF run, step 1) differ from the run's ({}); resume with the same ones",
                out.display(),
                collm_core::fields::differences(&old, &run_file).join("; ")
            );
        }
    }
    write_file_atomic(
        &run.join(CONFIG_FILE),
        toml::to_string(&run_file)?.as_bytes(),
    )?;
    let model = crate::run::build_model(cfg, &ds, &device)?;
    let mut state = RunState::default();
    if !cfg.mode.trains() {
        state.stopped = Some("no training (icl)".into());
        run.write_json(METRICS_FILE, &state)?;
        run.finish()?;
        return Ok(state);
    }
    let opt = optimizer(&model, cfg)?;
    let titles = &ds.titles;
    let train = train_rows(cfg, &ds.train()?.rows);
    let lens = if cfg.training.length_buckets > 1 {
        Some(model.prompt_lengths(&train, titles)?)
    } else {
        None
    };
    let pb = progress_bar(
        cfg.training.max_steps,
        "step",
        format!("train {}", cfg.mode.name()),
        opts.quiet,
    );
    let vars: Vec<candle_core::Var> = opt.vars().into_iter().cloned().collect();
    let mut trainer = CollmTrainer {
        cfg,
        per_epoch: train.len().div_ceil(cfg.training.batch_size).max(1),
        valid: valid_sample(cfg, &ds.split("valid")?.rows),
        counts: TrainCounts::from_dataset(&ds)?,
        titles,
        train,
        lens,
        model,
        opt,
        vars,
        pb,
        t0: std::time::Instant::now(),
        last_eval: std::time::Instant::now(),
        last_report: None,
    };
    let minutes = cfg.training.checkpoint_minutes;
    let state = drive(
        &mut trainer,
        &mut run,
        RunState::default(),
        METRICS_FILE,
        opts.stop_after,
        (minutes > 0.0).then(|| std::time::Duration::from_secs_f64(minutes * 60.0)),
    )?;
    trainer.pb.finish_and_clear();
    run.finish()?;
    Ok(state)
}

impl LoopState for RunState {
    fn best_auc(&self) -> Option<f64> {
        self.best_valid.as_ref().and_then(|b| b.auc)
    }
    fn without_improvement(&mut self) -> &mut usize {
        &mut self.evals_without_improvement
    }
    fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }
    fn set_stopped(&mut self, why: &str) {
        self.stopped = Some(why.into());
    }
}

/// A CoLLM run's side of the scaffold: an interval is `eval_every` optimizer steps (fewer at
/// the end of the budget), each of `grad_accum` micro-batches in a data order fixed by (seed,
/// epoch), with the NaN guard; then a validation on the fixed valid subsample.
struct CollmTrainer<'a> {
    cfg: &'a ExperimentConfig,
    model: CoLlm,
    opt: Adam,
    vars: Vec<candle_core::Var>,
    titles: &'a [String],
    train: Vec<Interaction>,
    valid: Vec<Interaction>,
    counts: TrainCounts,
    lens: Option<Vec<usize>>,
    per_epoch: usize,
    pb: collm_core::progress::Progress,
    t0: std::time::Instant,
    last_eval: std::time::Instant,
    last_report: Option<Report>,
}

impl CollmTrainer<'_> {
    /// One optimizer step (its micro-batches), or a skipped one when the NaN guard trips.
    fn step(&mut self, state: &mut RunState) -> Result<()> {
        let (cfg, t) = (self.cfg, &self.cfg.training);
        let mut acc: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut step_loss = 0.0;
        let mut finite = true;
        for micro in 0..t.grad_accum {
            let global = state.step * t.grad_accum + micro;
            let (epoch, pos) = (global / self.per_epoch, global % self.per_epoch);
            let order = match &self.lens {
                Some(l) => bucketed_order(cfg.seed, epoch, l, t.batch_size, t.length_buckets),
                None => epoch_order(cfg.seed, epoch, self.train.len()),
            };
            let rows: Vec<&Interaction> = order
                [pos * t.batch_size..((pos + 1) * t.batch_size).min(self.train.len())]
                .iter()
                .map(|&k| &self.train[k])
                .collect();
            let ctx = TrainCtx::new(cfg.seed.wrapping_add(global as u64 * 7919));
            let scores = self.model.scores(&rows, self.titles, Some(&ctx), true)?;
            let labels: Vec<f32> = rows.iter().map(|r| r.label as f32).collect();
            let labels = Tensor::from_vec(labels, rows.len(), scores.device())?;
            let loss = (bce_with_logits(&scores, &labels)? / t.grad_accum as f64)?;
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                finite = false;
                break;
            }
            step_loss += l;
            let grads = loss.backward()?;
            for (k, v) in self.vars.iter().enumerate() {
                if let Some(g) = grads.get(v.as_tensor()) {
                    acc[k] = Some(match acc[k].take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        let norm = if finite {
            clip_grad_norm(&mut acc, t.clip_norm)?
        } else {
            f64::NAN
        };
        if finite && norm.is_finite() {
            self.opt.lr = cfg.lr_at(state.step);
            self.opt.step_with(&acc)?;
            state.interval_loss_sum += step_loss;
            state.interval_steps += 1;
        } else {
            state.skipped_steps += 1;
            tracing::warn!(
                "step {}: non-finite loss or gradients, step skipped ({} so far)",
                state.step + 1,
                state.skipped_steps
            );
            if state.skipped_steps > 20 {
                bail!(
                    "more than 20 steps with non-finite loss or gradients: lower the learning rate"
                );
            }
        }
        state.step += 1;
        // A stop asked for is taken at the interval's next tick (with a checkpoint of this
        // step) or after its validation, not here.
        let _ = self.pb.inc(1);
        Ok(())
    }
}

impl Trainer for CollmTrainer<'_> {
    type State = RunState;

    fn restore(&mut self, ckpt: &Path) -> Result<()> {
        load_groups(&self.model, ckpt)?;
        self.opt.load(&ckpt.join("optimizer.safetensors"))
    }

    fn start(&mut self, state: &mut RunState) -> Result<()> {
        let kernel = self.model.backbone.decoder.kernel().name().to_string();
        tracing::info!(
            "kernel: {} (chosen: {}); {}",
            kernel,
            collm_llm::ops::kernel_choice().map_or_else(|e| e, |c| c.describe()),
            collm_core::machine::cpu_description()
        );
        if state.kernels.last() != Some(&kernel) {
            state.kernels.push(kernel);
        }
        if state.step == 0 && self.cfg.model.calibrate {
            // The first rows of the epoch-0 order, under the initial weights.
            let order = epoch_order(self.cfg.seed, 0, self.train.len());
            let first: Vec<Interaction> = order
                .iter()
                .take(64)
                .map(|&k| self.train[k].clone())
                .collect();
            let raw = self.model.predict_shared(&first, self.titles, false)?;
            state.score_offset = raw.iter().sum::<f64>() / raw.len().max(1) as f64;
            tracing::info!(
                "calibration: score offset {:.3} (mean raw score of {} train rows)",
                state.score_offset,
                raw.len()
            );
        }
        self.model.score_offset = state.score_offset;
        self.pb.set_position(state.step as u64);
        Ok(())
    }

    fn interval(&mut self, state: &mut RunState, between: &mut Between) -> Result<Validation> {
        let t = &self.cfg.training;
        loop {
            self.step(state)?;
            if state.step.is_multiple_of(t.eval_every) || state.step == t.max_steps {
                break;
            }
            between.tick(self, state)?;
        }
        let scores = collm_core::progress::defer_interrupts(|| {
            self.model.predict_shared(&self.valid, self.titles, false)
        })?;
        let report = Report::compute(&self.counts, &self.valid, &scores)?;
        state.train_seconds += self.last_eval.elapsed().as_secs_f64();
        self.last_eval = std::time::Instant::now();
        state.curve.push(EvalPoint {
            step: state.step,
            train_loss: state.interval_loss_sum / state.interval_steps.max(1) as f64,
            valid_auc: report.auc,
            valid_uauc: report.uauc,
            lr: self.opt.lr,
            seconds: self.t0.elapsed().as_secs_f64(),
        });
        state.interval_loss_sum = 0.0;
        state.interval_steps = 0;
        let auc = report.auc;
        self.last_report = Some(report);
        Ok(Validation { auc })
    }

    fn keep_best(&mut self, state: &mut RunState, run: &Path) -> Result<()> {
        save_groups(&self.model, &run.join(BEST_DIR))?;
        state.best_step = Some(state.step);
        state.best_valid = self.last_report.clone();
        Ok(())
    }

    fn budget_spent(&self, state: &RunState) -> Option<&'static str> {
        (state.step >= self.cfg.training.max_steps).then_some("max_steps")
    }

    fn patience(&self) -> usize {
        self.cfg.training.patience
    }

    fn checkpoint(&self, dir: &Path) -> Result<()> {
        save_groups(&self.model, dir)?;
        self.opt.save(&dir.join("optimizer.safetensors"))
    }

    fn validated(&mut self, state: &RunState, v: &Validation) {
        self.pb.set_message(format!(
            "valid auc {:.4} (best {:.4})",
            v.auc.unwrap_or(f64::NAN),
            state.best_auc().unwrap_or(f64::NAN)
        ));
    }
}

/// The program's compute device ([`collm_llm::device`]).
pub use collm_llm::device;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketed_order_is_a_seeded_permutation_with_less_padding() {
        let lens: Vec<usize> = (0..1000).map(|k| 20 + (k * 7919) % 97).collect();
        let (batch, window) = (8, 16);
        let order = bucketed_order(3, 2, &lens, batch, window);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>(), "a permutation");
        assert_eq!(order, bucketed_order(3, 2, &lens, batch, window), "seeded");
        assert_ne!(
            order,
            bucketed_order(3, 3, &lens, batch, window),
            "per epoch"
        );
        assert_eq!(
            bucketed_order(3, 2, &lens, batch, 1),
            epoch_order(3, 2, 1000)
        );
        // Padded tokens: sum over batches of (max length · size − sum of lengths).
        let padding = |o: &[usize]| -> usize {
            o.chunks(batch)
                .map(|b| {
                    let max = b.iter().map(|&k| lens[k]).max().unwrap();
                    b.iter().map(|&k| max - lens[k]).sum::<usize>()
                })
                .sum()
        };
        let plain = padding(&epoch_order(3, 2, 1000));
        let grouped = padding(&order);
        assert!(grouped * 4 < plain, "padding {grouped} vs {plain}");
        // Each window holds the same rows as the plain order's window.
        let base = epoch_order(3, 2, 1000);
        for (a, b) in order
            .chunks(batch * window)
            .zip(base.chunks(batch * window))
        {
            let (mut a, mut b) = (a.to_vec(), b.to_vec());
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b);
        }
    }
}
