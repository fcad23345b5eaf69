//! Training and scoring throughput of a collaborative model on a dataset (`collm bench cf`).
//!
//! The baseline, measured in the same run on the same rows and model, is one forward pass
//! over the train split in the training batch size with no gradients (what scoring the split
//! costs). A model's epoch is reported as seconds and as a multiple of that pass, so a number
//! from a noisy shared machine still says what backward and Adam add on top of the forward.

use crate::train::{optimizer, predict, train_epoch};
use crate::{build_model, CfConfig};
use anyhow::{bail, Result};
use candle_core::Device;
use collm_data::Dataset;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct CfBench {
    pub model: String,
    pub dim: usize,
    pub batch_size: usize,
    pub train_rows: usize,
    pub valid_rows: usize,
    pub epochs: usize,
    /// Mean seconds of one training epoch (forward, backward, Adam over every batch).
    pub epoch_seconds: f64,
    pub train_samples_per_second: f64,
    /// Seconds of one gradient-free forward pass over the train split (the baseline).
    pub forward_seconds: f64,
    /// `epoch_seconds / forward_seconds`.
    pub epoch_over_forward: f64,
    /// Scoring the valid split (no gradients).
    pub score_samples_per_second: f64,
    /// Mean training loss of the last measured epoch (a sanity check that it learned).
    pub last_train_loss: f64,
}

/// Trains a fresh model for `epochs` epochs and scores the valid split once, timing both.
pub fn measure(cfg: &CfConfig, ds: &Dataset, epochs: usize) -> Result<CfBench> {
    if epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    cfg.validate()?;
    let device = Device::Cpu;
    let model = build_model(cfg, ds, &device)?;
    let train_rows = &ds.train()?.rows;
    let valid_rows = &ds.split("valid")?.rows;
    // Best of two forward passes: the floor, not its noise.
    let forward_pass = || -> Result<f64> {
        let t = Instant::now();
        predict(model.as_ref(), train_rows, cfg.batch_size, &device)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let forward = forward_pass()?.min(forward_pass()?);
    let mut opt = optimizer(model.as_ref(), cfg)?;
    let mut loss = f64::NAN;
    let t = Instant::now();
    for epoch in 0..epochs {
        loss = train_epoch(model.as_ref(), &mut opt, train_rows, cfg, epoch, &device)?;
    }
    let epoch_s = t.elapsed().as_secs_f64() / epochs as f64;
    let t = Instant::now();
    predict(model.as_ref(), valid_rows, cfg.eval_batch_size, &device)?;
    let score_s = t.elapsed().as_secs_f64();
    Ok(CfBench {
        model: cfg.model.name().to_string(),
        dim: cfg.dim,
        batch_size: cfg.batch_size,
        train_rows: train_rows.len(),
        valid_rows: valid_rows.len(),
        epochs,
        epoch_seconds: epoch_s,
        train_samples_per_second: train_rows.len() as f64 / epoch_s,
        forward_seconds: forward,
        epoch_over_forward: epoch_s / forward.max(1e-9),
        score_samples_per_second: valid_rows.len() as f64 / score_s.max(1e-9),
        last_train_loss: loss,
    })
}

/// The table `collm bench cf` prints for its rows.
pub fn render(rows: &[CfBench], epochs: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{} train rows, {} valid rows, {} epoch(s) each",
        rows.first().map_or(0, |r| r.train_rows),
        rows.first().map_or(0, |r| r.valid_rows),
        epochs
    );
    let _ = writeln!(
        s,
        "{:<9} {:>4} {:>6} {:>9} {:>12} {:>11} {:>10} {:>12}",
        "model", "d", "batch", "s/epoch", "train rows/s", "forward s", "epoch/fwd", "score rows/s"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<9} {:>4} {:>6} {:>9.2} {:>12.0} {:>11.3} {:>9.1}x {:>12.0}",
            r.model,
            r.dim,
            r.batch_size,
            r.epoch_seconds,
            r.train_samples_per_second,
            r.forward_seconds,
            r.epoch_over_forward,
            r.score_samples_per_second
        );
    }
    s
}

/// Training from a trained run's weights with subnormal floats kept and flushed to zero
/// (`collm bench denormals`): the same weights, a fresh Adam, the same epochs, in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct DenormalBench {
    pub model: String,
    /// Trainable values of the run's weights, and how many of them are subnormal f32.
    pub params: usize,
    pub subnormal_params: usize,
    pub epochs: usize,
    /// Best of two rounds (kept, flushed, kept, flushed), seconds per epoch.
    pub kept_epoch_seconds: f64,
    pub flushed_epoch_seconds: f64,
    /// `kept_epoch_seconds / flushed_epoch_seconds`.
    pub speedup: f64,
    /// Mean training loss of the last epoch either way (they agree but for values below 1.2e-38).
    pub kept_loss: f64,
    pub flushed_loss: f64,
}

/// Times `epochs` training epochs from the weights of the collaborative run `run` with
/// subnormals kept and with them flushed (collm_core::denormals), twice each, alternating; the
/// process's mode is restored afterwards.
pub fn measure_denormals(
    run: &std::path::Path,
    ds: &Dataset,
    epochs: usize,
) -> Result<DenormalBench> {
    if epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    if !collm_core::denormals::supported() {
        bail!("flushing subnormals is x86-64 only: nothing to compare here");
    }
    let device = Device::Cpu;
    let (cfg, model) = crate::run::load_model(run, ds, &device)?;
    let (mut params, mut subnormal) = (0, 0);
    for (_, v) in model.params().trainable() {
        let x = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        params += x.len();
        subnormal += x.iter().filter(|x| x.is_subnormal()).count();
    }
    let train_rows = &ds.train()?.rows;
    let before = collm_core::denormals::flushing();
    let mut best = [f64::INFINITY; 2];
    let mut loss = [f64::NAN; 2];
    let result = (|| -> Result<()> {
        for _round in 0..2 {
            for (k, flush) in [false, true].into_iter().enumerate() {
                collm_core::denormals::set(flush);
                let (_, model) = crate::run::load_model(run, ds, &device)?;
                let mut opt = optimizer(model.as_ref(), &cfg.cf)?;
                let t = Instant::now();
                for epoch in 0..epochs {
                    loss[k] = train_epoch(
                        model.as_ref(),
                        &mut opt,
                        train_rows,
                        &cfg.cf,
                        epoch,
                        &device,
                    )?;
                }
                best[k] = best[k].min(t.elapsed().as_secs_f64() / epochs as f64);
            }
        }
        Ok(())
    })();
    collm_core::denormals::set(before);
    result?;
    Ok(DenormalBench {
        model: cfg.cf.model.name().to_string(),
        params,
        subnormal_params: subnormal,
        epochs,
        kept_epoch_seconds: best[0],
        flushed_epoch_seconds: best[1],
        speedup: best[0] / best[1].max(1e-9),
        kept_loss: loss[0],
        flushed_loss: loss[1],
    })
}
