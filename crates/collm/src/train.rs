//! Training and evaluating a CoLLM run (step 1, step 2, the variants and the baselines).
//!
//! AdamW (decay on ≥2-D weights only), linear warm-up then cosine, global-norm clipping, a
//! NaN/inf guard (a step whose loss or gradients are not finite is skipped), gradient
//! accumulation, validation every N steps on a fixed valid subsample, early stopping on its AUC.
//!
//! ```text
//! RUN/
//!   config.toml      the experiment config + hashed references (data, backbone, CF run, step 1)
//!   best/            the best weights: one safetensors per trained group (mapper, cf,
//!                    soft_prompt, ui_token); the LoRA once, as a PEFT adapter in best/lora/
//!                    (adapter_config.json, adapter_model.safetensors, collm.json: the backbone)
//!   checkpoint/      the last validation's weights, optimizer state and loop state (resume)
//!   metrics.json     the curve and the best validation
//! ```
//! Only what was trained is saved. A killed run resumes from its last checkpoint with the same
//! optimizer state and data order (each epoch's order comes from (seed, epoch)).

use crate::experiment::ExperimentConfig;
use crate::model::{CoLlm, BEST_DIR};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use collm_data::io::write_file_atomic;
use collm_data::subsets::TrainCounts;
use collm_data::{Dataset, Interaction};
use collm_metrics::{Report, RunKind};
use collm_nn::layers::bce_with_logits;
use collm_nn::optim::{clip_grad_norm, Adam, Decay};
use collm_nn::run::{epoch_seed, OpenMode, RunDir};
use collm_nn::scaffold::{drive, progress_bar, LoopState, Trainer, Validation};
use collm_nn::TrainCtx;
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.json";

/// Hashed references to everything a run depends on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Refs {
    pub data_content_sha256: String,
    pub backbone_sha256: String,
    pub cf_run_model_sha256: Option<String>,
    pub step1_lora_sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunFile {
    pub experiment: ExperimentConfig,
    pub refs: Refs,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalPoint {
    pub step: usize,
    pub train_loss: f64,
    pub valid_auc: Option<f64>,
    pub valid_uauc: Option<f64>,
    pub lr: f64,
    pub seconds: f64,
}

/// `metrics.json`, also the loop state kept in the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunState {
    /// Always `collm` (absent in files written before it was recorded).
    #[serde(default = "collm_kind")]
    pub kind: RunKind,
    pub step: usize,
    /// The score offset measured when training started (`calibrate`), used by every later
    /// score of the run.
    #[serde(default)]
    pub score_offset: f64,
    pub curve: Vec<EvalPoint>,
    pub best_step: Option<usize>,
    pub best_valid: Option<Report>,
    pub evals_without_improvement: usize,
    pub skipped_steps: usize,
    pub stopped: Option<String>,
    pub train_seconds: f64,
}

fn collm_kind() -> RunKind {
    RunKind::Collm
}

impl Default for RunState {
    fn default() -> Self {
        Self {
            kind: RunKind::Collm,
            step: 0,
            score_offset: 0.0,
            curve: Vec::new(),
            best_step: None,
            best_valid: None,
            evals_without_improvement: 0,
            skipped_steps: 0,
            stopped: None,
            train_seconds: 0.0,
        }
    }
}

fn sha256_path(p: &Path) -> Result<String> {
    if p.is_file() {
        return collm_data::io::sha256_file(p);
    }
    // A model directory: its config and weight files, by name, size and content of config.
    let mut h = Sha256::new();
    let mut names: Vec<_> = std::fs::read_dir(p)
        .with_context(|| format!("{}: cannot read", p.display()))?
        .filter_map(|e| e.ok())
        .collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let name = e.file_name().to_string_lossy().into_owned();
        h.update(name.as_bytes());
        h.update(e.metadata()?.len().to_le_bytes());
        if name.ends_with(".json") {
            h.update(std::fs::read(e.path())?);
        }
    }
    Ok(hex::encode(h.finalize()))
}

pub fn refs(cfg: &ExperimentConfig, ds: &Dataset) -> Result<Refs> {
    if let (Some(step1), true) = (&cfg.model.step1, cfg.mode.needs_step1()) {
        check_step1(step1, cfg, ds)?;
    }
    Ok(Refs {
        data_content_sha256: ds.manifest.content_sha256.clone(),
        backbone_sha256: sha256_path(&cfg.model.backbone)?,
        cf_run_model_sha256: match &cfg.model.cf_run {
            Some(r) if cfg.mode.uses_cf() => Some(sha256_path(&r.join("model.safetensors"))?),
            _ => None,
        },
        step1_lora_sha256: match &cfg.model.step1 {
            Some(r) if cfg.mode.needs_step1() => {
                // The file step 2 loads.
                Some(sha256_path(&group_file(&r.join(BEST_DIR), "lora"))?)
            }
            _ => None,
        },
    })
}

/// A step-2 run's `step1` must be a LoRA-training run on the same data and backbone.
fn check_step1(step1: &Path, cfg: &ExperimentConfig, ds: &Dataset) -> Result<()> {
    let rf = load_run_file(step1).with_context(|| format!("'step1' = {}", step1.display()))?;
    if !rf.experiment.mode.trains_lora() {
        bail!(
            "'step1' = {}: a '{}' run, which trains no LoRA (expected a 'tallrec' run)",
            step1.display(),
            rf.experiment.mode.name()
        );
    }
    if rf.refs.data_content_sha256 != ds.manifest.content_sha256 {
        bail!(
            "'step1' = {}: trained on other data (content sha256 {}) than {} (content sha256 {}): train step 1 on this dataset",
            step1.display(),
            &rf.refs.data_content_sha256[..12.min(rf.refs.data_content_sha256.len())],
            cfg.data.path.display(),
            &ds.manifest.content_sha256[..12]
        );
    }
    let backbone = sha256_path(&cfg.model.backbone)?;
    if rf.refs.backbone_sha256 != backbone {
        bail!(
            "'step1' = {}: trained on another backbone ({}) than {}",
            step1.display(),
            rf.experiment.model.backbone.display(),
            cfg.model.backbone.display()
        );
    }
    Ok(())
}

/// The LoRA of a weights directory (`best/` or a checkpoint), a PEFT adapter directory.
pub const LORA_DIR: &str = "lora";
/// collm's own notes next to the PEFT adapter (the backbone file it was trained on).
pub const LORA_META: &str = "collm.json";

/// Where a trained group's weights live in a weights directory: the LoRA once, as a PEFT
/// adapter (`lora/adapter_model.safetensors`, PEFT's key names), every other group as
/// `GROUP.safetensors`.
pub fn group_file(dir: &Path, group: &str) -> PathBuf {
    if group == "lora" {
        dir.join(LORA_DIR).join("adapter_model.safetensors")
    } else {
        dir.join(format!("{group}.safetensors"))
    }
}

fn save_groups(model: &CoLlm, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for (group, store) in model.trainable_stores() {
        match (group, &model.lora) {
            ("lora", Some(l)) => {
                let backbone = &model.config.model.backbone;
                let adapter = dir.join(LORA_DIR);
                l.save_peft(&adapter, &collm_llm::lora::peft_base_name(backbone))?;
                let meta = serde_json::json!({
                    "backbone": backbone.display().to_string(),
                    "backbone_sha256": sha256_path(backbone)?,
                });
                write_file_atomic(
                    &adapter.join(LORA_META),
                    serde_json::to_string_pretty(&meta)?.as_bytes(),
                )?;
            }
            _ => store.save(&group_file(dir, group))?,
        }
    }
    write_weights_manifest(dir)
}

/// The SHA-256 of every file a weights directory holds (`best/`, a checkpoint), kept beside
/// them and checked when they load: a swapped adapter or an edited `adapter_config.json` is
/// refused, not silently used.
pub const WEIGHTS_MANIFEST: &str = "weights.sha256.json";

fn weight_files(dir: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        for e in
            std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))?
        {
            let p = e?.path();
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name == WEIGHTS_MANIFEST || name.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out)?;
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, collm_data::io::sha256_file(&p)?);
            }
        }
        Ok(())
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

fn write_weights_manifest(dir: &Path) -> Result<()> {
    let files = weight_files(dir)?;
    write_file_atomic(
        &dir.join(WEIGHTS_MANIFEST),
        serde_json::to_string_pretty(&files)?.as_bytes(),
    )
}

/// Checks a weights directory against its manifest (directories written before it was kept
/// have none, and load as before).
pub(crate) fn check_weights_manifest(dir: &Path) -> Result<()> {
    let p = dir.join(WEIGHTS_MANIFEST);
    if !p.is_file() {
        return Ok(());
    }
    let want: std::collections::BTreeMap<String, String> = serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?,
    )
    .with_context(|| format!("{}: invalid", p.display()))?;
    let have = weight_files(dir)?;
    for (file, sha) in &want {
        match have.get(file) {
            None => bail!(
                "{}: missing (the run recorded it in {WEIGHTS_MANIFEST})",
                dir.join(file).display()
            ),
            Some(h) if h != sha => bail!(
                "{}: changed since the run wrote it (sha256 {}, recorded {}): the run's weights or adapter config were replaced or edited",
                dir.join(file).display(),
                &h[..12],
                &sha[..12.min(sha.len())]
            ),
            _ => {}
        }
    }
    Ok(())
}

fn load_groups(model: &CoLlm, dir: &Path) -> Result<()> {
    check_weights_manifest(dir)?;
    for (group, store) in model.trainable_stores() {
        let mut p = group_file(dir, group);
        // Runs written before the LoRA was kept once kept it as lora.safetensors too.
        let legacy = dir.join(format!("{group}.safetensors"));
        if !p.is_file() && legacy.is_file() {
            p = legacy;
        }
        store
            .load(&p)
            .with_context(|| format!("loading the trained '{group}' weights"))?;
    }
    Ok(())
}

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
        let old = load_run_file(out)?;
        if old != run_file {
            bail!(
                "{}: the config or its inputs (data, backbone, CF run, step 1) differ from the run's; resume with the same ones",
                out.display()
            );
        }
    }
    write_file_atomic(
        &run.join(CONFIG_FILE),
        toml::to_string(&run_file)?.as_bytes(),
    )?;
    let model = CoLlm::build(cfg, &ds, &device)?;
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
        loss_sum: 0.0,
        loss_n: 0,
        t0: std::time::Instant::now(),
        last_eval: std::time::Instant::now(),
        last_report: None,
    };
    let state = drive(
        &mut trainer,
        &mut run,
        RunState::default(),
        METRICS_FILE,
        opts.stop_after,
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
    pb: collm_data::progress::Progress,
    loss_sum: f64,
    loss_n: usize,
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
            self.loss_sum += step_loss;
            self.loss_n += 1;
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
        self.pb.inc(1)?;
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

    fn interval(&mut self, state: &mut RunState) -> Result<Validation> {
        let t = &self.cfg.training;
        loop {
            self.step(state)?;
            if state.step.is_multiple_of(t.eval_every) || state.step == t.max_steps {
                break;
            }
        }
        let scores = self.model.predict_shared(&self.valid, self.titles, false)?;
        let report = Report::compute(&self.counts, &self.valid, &scores)?;
        state.train_seconds += self.last_eval.elapsed().as_secs_f64();
        self.last_eval = std::time::Instant::now();
        state.curve.push(EvalPoint {
            step: state.step,
            train_loss: self.loss_sum / self.loss_n.max(1) as f64,
            valid_auc: report.auc,
            valid_uauc: report.uauc,
            lr: self.opt.lr,
            seconds: self.t0.elapsed().as_secs_f64(),
        });
        self.loss_sum = 0.0;
        self.loss_n = 0;
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

pub fn load_run_file(run: &Path) -> Result<RunFile> {
    let p = run.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "{}: cannot read (is {} a run directory made by `collm train collm`?)",
            p.display(),
            run.display()
        )
    })?;
    let origin = p.display().to_string();
    let mut t: toml::Table =
        toml::from_str(&text).with_context(|| format!("{origin}: invalid run config"))?;
    // Runs written before the nested layout hold a flat [experiment]: read through the same
    // migration as config files.
    let experiment = match t.remove("experiment") {
        Some(toml::Value::Table(e)) => ExperimentConfig::from_table(e, &origin)?,
        _ => bail!("{origin}: no [experiment] table (is this a CoLLM run?)"),
    };
    let refs: Refs = t
        .remove("refs")
        .ok_or_else(|| anyhow::anyhow!("{origin}: no [refs] table"))?
        .try_into()
        .with_context(|| format!("{origin}: invalid [refs]"))?;
    if let Some(k) = t.keys().next() {
        bail!("{origin}: unknown table '{k}'");
    }
    Ok(RunFile { experiment, refs })
}

/// The inputs a run recorded (backbone, CF run, step-1 adapter) are the ones it would load now.
fn check_refs(run: &Path, rf: &RunFile, ds: &Dataset) -> Result<()> {
    let now = refs(&rf.experiment, ds)?;
    let m = &rf.experiment.model;
    let short = |s: &Option<String>| {
        s.as_deref()
            .map_or("none".to_string(), |s| s[..12.min(s.len())].to_string())
    };
    if now.backbone_sha256 != rf.refs.backbone_sha256 {
        bail!(
            "run {}: its backbone {} is not the file it was trained with (sha256 {}, recorded {})",
            run.display(),
            m.backbone.display(),
            &now.backbone_sha256[..12],
            &rf.refs.backbone_sha256[..12.min(rf.refs.backbone_sha256.len())]
        );
    }
    if now.cf_run_model_sha256 != rf.refs.cf_run_model_sha256 {
        bail!(
            "run {}: the CF run {} holds another model than it was trained with (model.safetensors sha256 {}, recorded {}): retrained or replaced",
            run.display(),
            m.cf_run.as_deref().map_or("-".into(), |p| p.display().to_string()),
            short(&now.cf_run_model_sha256),
            short(&rf.refs.cf_run_model_sha256)
        );
    }
    if now.step1_lora_sha256 != rf.refs.step1_lora_sha256 {
        bail!(
            "run {}: the step-1 adapter of {} is not the one it was trained with (sha256 {}, recorded {}): retrained or replaced",
            run.display(),
            m.step1.as_deref().map_or("-".into(), |p| p.display().to_string()),
            short(&now.step1_lora_sha256),
            short(&rf.refs.step1_lora_sha256)
        );
    }
    Ok(())
}

/// Loads a run's model with its best weights (ICL: the base model).
pub fn load_run(run: &Path) -> Result<(RunFile, Dataset, CoLlm)> {
    let rf = load_run_file(run)?;
    let ds = Dataset::load(&rf.experiment.data.path)?;
    if ds.manifest.content_sha256 != rf.refs.data_content_sha256 {
        bail!(
            "run {} was trained on other data than {} now holds (content sha256 differs)",
            run.display(),
            rf.experiment.data.path.display()
        );
    }
    check_refs(run, &rf, &ds)?;
    let mut model = CoLlm::build(&rf.experiment, &ds, &device())?;
    if rf.experiment.mode.trains() {
        if rf.experiment.model.calibrate {
            let metrics = run.join(METRICS_FILE);
            let state: RunState = serde_json::from_str(
                &std::fs::read_to_string(&metrics)
                    .with_context(|| format!("{}: cannot read", metrics.display()))?,
            )
            .with_context(|| format!("{}: invalid", metrics.display()))?;
            model.score_offset = state.score_offset;
        }
        let best = run.join(BEST_DIR);
        if !best.is_dir() {
            bail!(
                "{}: not found (the run has not finished a validation yet)",
                best.display()
            );
        }
        load_groups(&model, &best)?;
    }
    Ok((rf, ds, model))
}

/// Evaluates a run on a split: the metrics module's report, and the scores.
pub fn evaluate(run: &Path, split: &str, progress: bool) -> Result<(Report, Vec<f64>)> {
    let (_, ds, model) = load_run(run)?;
    let rows = &ds.split(split)?.rows;
    let scores = model.predict_shared(rows, &ds.titles, progress)?;
    Ok((Report::for_split(&ds, split, &scores)?, scores))
}

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
