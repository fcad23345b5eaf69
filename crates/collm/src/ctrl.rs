//! CTRL (Li et al., 2023, arXiv 2306.02841), the paper's Table 2 baseline that aligns a
//! collaborative model with a language model and then predicts clicks with the collaborative
//! model alone. The authors released no code; this follows the published method:
//!
//! 1. **Texts.** Each train row's user and item as text: "This is a user, who has recently
//!    watched A|B|…. This is a movie, title is X." (the last `history_titles` liked titles).
//!    The semantic encoder is the backbone (SmolLM2 here, RoBERTa in the paper), frozen: the
//!    mean over a text's tokens of its last hidden state, computed once per text and cached in
//!    the run (`ctrl/texts.safetensors`, keyed by the dataset, backbone and text settings).
//! 2. **Stage 1, alignment.** The collaborative model's representation of the row (DIN's `u`:
//!    target item, attention-pooled history, user; 3·e wide) and the text encoding are each
//!    projected (a linear layer) to `dim` (128) and split into `sub_spaces` (M) parts, each
//!    L2-normalised. Fine-grained similarity `s(a, b) = Σ_m max_m' ⟨a_m, b_m'⟩`; the loss is the
//!    mean of the two directions' InfoNCE over in-batch negatives at temperature 0.7. The
//!    collaborative model and both projections train (Adam); the language model stays frozen.
//! 3. **Stage 2, fine-tuning.** The language model and the projections are dropped; the
//!    collaborative model keeps its aligned parameters, gets a new head (its MLP and output
//!    layer freshly initialised) and trains on the click labels (BCE) as any collaborative run
//!    ([`collm_cf::train::train`], started from `ctrl/stage1.safetensors`). The run is a
//!    collaborative-model run: `collm eval cf`, `score`, `rank` and `serve` read it as such.
//!
//! Where this chooses: L2-normalised sub-spaces (the paper leaves the scale to the
//! temperature), the head re-initialised in stage 2, the stage-1 settings of
//! `configs/ml-1m/ctrl.toml` (say why there).

use crate::train::device;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use collm_cf::train::{TrainMetrics, TrainOptions as CfOptions};
use collm_cf::{build_model, CfBatch, CfConfig, ModelKind, TrainCtx};
use collm_core::io::{crash_point, write_file_atomic};
use collm_core::progress::Progress;
use collm_data::{Dataset, Interaction};
use collm_nn::layers::Linear;
use collm_nn::optim::{Adam, Decay};
use collm_nn::params::ParamStore;
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The stage-1 directory inside the run.
pub const CTRL_DIR: &str = "ctrl";
const TEXTS: &str = "texts.safetensors";
const TEXTS_KEY: &str = "texts.json";
const STAGE1: &str = "stage1.safetensors";
const STAGE1_DONE: &str = "stage1.json";

mod defaults {
    pub fn dim() -> usize {
        128
    }
    pub fn sub_spaces() -> usize {
        4
    }
    pub fn temperature() -> f64 {
        0.7
    }
    pub fn batch() -> usize {
        256
    }
    pub fn epochs() -> usize {
        2
    }
    pub fn lr() -> f64 {
        1e-3
    }
    pub fn titles() -> usize {
        10
    }
    pub fn text_batch() -> usize {
        16
    }
}

/// CTRL's own settings (`[ctrl]` of its config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CtrlSettings {
    /// The semantic encoder: a backbone (HF directory or GGUF), frozen.
    pub backbone: PathBuf,
    /// The shared space both sides are projected to.
    #[serde(default = "defaults::dim")]
    pub dim: usize,
    /// M: the sub-spaces of the fine-grained similarity (`dim` must split into them).
    #[serde(default = "defaults::sub_spaces")]
    pub sub_spaces: usize,
    #[serde(default = "defaults::temperature")]
    pub temperature: f64,
    /// Rows per stage-1 batch: the in-batch negatives.
    #[serde(default = "defaults::batch")]
    pub batch_size: usize,
    /// Stage-1 passes over the train rows.
    #[serde(default = "defaults::epochs")]
    pub epochs: usize,
    #[serde(default = "defaults::lr")]
    pub lr: f64,
    /// Liked titles in a row's text (the most recent).
    #[serde(default = "defaults::titles")]
    pub history_titles: usize,
    /// Texts per backbone pass when encoding.
    #[serde(default = "defaults::text_batch")]
    pub text_batch: usize,
}

/// A CTRL run's config: the collaborative model (`[cf]`, DIN in the paper's table) and `[ctrl]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CtrlConfig {
    pub cf: CfConfig,
    pub ctrl: CtrlSettings,
}

impl CtrlConfig {
    /// Reads a CTRL config: `[cf]` a collaborative model's config (`model` required, the rest
    /// defaulting per model, as `collm train cf --config`), `[ctrl]` CTRL's own settings.
    pub fn load(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{origin}: cannot read"))?;
        let mut table: toml::Table =
            toml::from_str(&text).with_context(|| format!("{origin}: not valid TOML"))?;
        let cf = match table.remove("cf") {
            Some(toml::Value::Table(t)) => t,
            _ => bail!("{origin}: missing [cf] (the collaborative model: model = \"din\", …)"),
        };
        let ctrl = match table.remove("ctrl") {
            Some(toml::Value::Table(t)) => t,
            _ => bail!("{origin}: missing [ctrl] (at least backbone = …)"),
        };
        if let Some(k) = table.keys().next() {
            bail!("{origin}: unknown field '{k}' (a CTRL config holds [cf] and [ctrl])");
        }
        let cf = CfConfig::from_toml(&toml::to_string(&cf)?, &format!("{origin} [cf]"))?;
        let ctrl: CtrlSettings = ctrl
            .try_into()
            .with_context(|| format!("{origin}: invalid [ctrl]"))?;
        let cfg = CtrlConfig { cf, ctrl };
        cfg.validate().with_context(|| origin.clone())?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        use collm_core::fields::{check, End};
        self.cf.validate()?;
        if self.cf.model != ModelKind::Din {
            bail!("[cf] model must be din for CTRL (the collaborative model the paper aligns)");
        }
        let c = &self.ctrl;
        for (name, v) in [
            ("ctrl.dim", c.dim),
            ("ctrl.sub_spaces", c.sub_spaces),
            ("ctrl.batch_size", c.batch_size),
            ("ctrl.epochs", c.epochs),
            ("ctrl.text_batch", c.text_batch),
        ] {
            if v == 0 {
                bail!("'{name}' must be at least 1");
            }
        }
        if !c.dim.is_multiple_of(c.sub_spaces) {
            bail!(
                "'ctrl.dim' ({}) must split into 'ctrl.sub_spaces' ({})",
                c.dim,
                c.sub_spaces
            );
        }
        if c.batch_size < 2 {
            bail!("'ctrl.batch_size' must be at least 2 (the in-batch negatives)");
        }
        check(
            "ctrl.temperature",
            c.temperature,
            End::Open(0.0),
            End::Closed(100.0),
        )?;
        check("ctrl.lr", c.lr, End::Open(0.0), End::Closed(10.0))?;
        Ok(())
    }
}

/// A row's text: "This is a user, who has recently watched A|B. This is a movie, title is X."
pub fn row_text(row: &Interaction, titles: &[String], history_titles: usize) -> String {
    let take = row.history.len().min(history_titles);
    let watched: Vec<&str> = row.history[row.history.len() - take..]
        .iter()
        .map(|&i| titles.get(i as usize).map_or("", String::as_str))
        .collect();
    let title = titles.get(row.iid as usize).map_or("", String::as_str);
    format!(
        "This is a user, who has recently watched {}. This is a movie, title is {title}.",
        watched.join("|")
    )
}

/// The fine-grained similarity of every pair of rows of `a` and `b`, each (B, M, d):
/// `s[i][j] = Σ_m max_m' ⟨a[i, m], b[j, m']⟩`, (B, B).
pub fn similarity(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, m, d) = a.dims3()?;
    let (nb, mb, db) = b.dims3()?;
    if (mb, db) != (m, d) {
        bail!("similarity: sides ({n}, {m}, {d}) and ({nb}, {mb}, {db})");
    }
    let prod = a
        .reshape((n * m, d))?
        .matmul(&b.reshape((nb * m, d))?.t()?)?
        .reshape((n, m, nb, m))?;
    Ok(prod.max(D::Minus1)?.sum(1)?)
}

/// The mean of the two directions' InfoNCE over in-batch negatives: row `i` of one side should
/// pick row `i` of the other. `a`, `b` (B, M, d) already normalised.
pub fn info_nce(a: &Tensor, b: &Tensor, temperature: f64) -> Result<Tensor> {
    let n = a.dim(0)?;
    let targets = Tensor::from_vec((0..n as u32).collect::<Vec<_>>(), n, a.device())?;
    let ab = (similarity(a, b)? / temperature)?;
    let ba = (similarity(b, a)? / temperature)?;
    let ce = |logits: &Tensor| candle_nn::loss::cross_entropy(logits, &targets);
    Ok(((ce(&ab)? + ce(&ba)?)? * 0.5)?)
}

/// `x` (B, dim) as M sub-spaces, each L2-normalised: (B, M, dim / M).
fn sub_spaces(x: &Tensor, m: usize) -> Result<Tensor> {
    let (n, dim) = x.dims2()?;
    let s = x.reshape((n, m, dim / m))?;
    let norm = (s.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(s.broadcast_div(&norm)?)
}

/// The key of the text-encoding cache: what the encodings depend on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct TextsKey {
    dataset_sha256: String,
    backbone: String,
    backbone_bytes: u64,
    history_titles: usize,
    rows: usize,
    version: u32,
}

/// The train rows' text encodings (rows × hidden), from the cache in `dir` when it holds these
/// (else computed with the frozen backbone, then cached).
fn text_encodings(
    s: &CtrlSettings,
    ds: &Dataset,
    rows: &[Interaction],
    dir: &Path,
    quiet: bool,
    dev: &Device,
) -> Result<Tensor> {
    let bytes = std::fs::metadata(&s.backbone)
        .map(|m| if m.is_dir() { 0 } else { m.len() })
        .with_context(|| format!("{}: cannot read the backbone", s.backbone.display()))?;
    let key = TextsKey {
        dataset_sha256: ds.manifest.content_sha256.clone(),
        backbone: s.backbone.display().to_string(),
        backbone_bytes: bytes,
        history_titles: s.history_titles,
        rows: rows.len(),
        version: 1,
    };
    let (cache, key_file) = (dir.join(TEXTS), dir.join(TEXTS_KEY));
    if let Ok(text) = std::fs::read_to_string(&key_file) {
        if serde_json::from_str::<TextsKey>(&text).ok().as_ref() == Some(&key) && cache.is_file() {
            let t = candle_core::safetensors::load(&cache, dev)?;
            if let Some(t) = t.get("texts") {
                tracing::info!("ctrl: text encodings from {}", cache.display());
                return Ok(t.clone());
            }
        }
    }
    let bb = collm_llm::Backbone::load(&s.backbone, DType::F32, dev)?;
    let texts: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| {
            bb.tokenizer
                .encode(&row_text(r, &ds.titles, s.history_titles))
        })
        .collect::<Result<_>>()?;
    // Batches of similar lengths (less padding), written back in row order.
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&k| texts[k].len());
    let hidden = bb.decoder.config.hidden_size;
    let mut out = vec![0f32; texts.len() * hidden];
    let pb = Progress::new(texts.len(), "texts", "ctrl: encoding".into(), quiet);
    for chunk in order.chunks(s.text_batch) {
        collm_core::progress::check()?;
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&k| texts[k].clone()).collect();
        let (emb, mask) = bb.decoder.embed_left_padded(&seqs, 0)?;
        let pooled = bb.decoder.mean_pooled(&emb, &mask)?.to_vec2::<f32>()?;
        for (&k, v) in chunk.iter().zip(pooled) {
            out[k * hidden..(k + 1) * hidden].copy_from_slice(&v);
        }
        pb.inc(chunk.len() as u64)?;
    }
    pb.finish_and_clear();
    let t = Tensor::from_vec(out, (texts.len(), hidden), dev)?;
    let tmp = dir.join(format!(".{TEXTS}.tmp"));
    candle_core::safetensors::save(
        &[("texts".to_string(), t.clone())].into_iter().collect(),
        &tmp,
    )?;
    std::fs::rename(&tmp, &cache)
        .with_context(|| format!("{}: cannot rename into place", cache.display()))?;
    crash_point();
    write_file_atomic(&key_file, serde_json::to_string_pretty(&key)?.as_bytes())?;
    Ok(t)
}

/// What stage 1 records (`ctrl/stage1.json`, written last: its presence means stage 1 is done).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stage1 {
    pub settings: CtrlSettings,
    pub cf: CfConfig,
    /// Mean InfoNCE per epoch.
    pub loss: Vec<f64>,
    pub seconds: f64,
    /// The parameters carried into stage 2 (all but the head).
    pub carried: Vec<String>,
}

/// Stage 1: aligns a fresh collaborative model with the text encodings of the train rows;
/// writes `ctrl/stage1.safetensors` (its parameters but the head) and `ctrl/stage1.json`.
fn stage1(cfg: &CtrlConfig, ds: &Dataset, dir: &Path, quiet: bool) -> Result<Stage1> {
    let (c, s) = (&cfg.cf, &cfg.ctrl);
    let dev = device();
    let rows = ds.train()?.rows.clone();
    let texts = text_encodings(s, ds, &rows, dir, quiet, &dev)?;
    let model = build_model(c, ds, &dev)?;
    let mut proj = ParamStore::new(&dev, c.seed ^ 0xc7e1);
    let to_shared_cf = Linear::new(&mut proj, "ctrl.cf", model.dim(), s.dim)?;
    let to_shared_text = Linear::new(&mut proj, "ctrl.text", texts.dim(1)?, s.dim)?;
    let mut params: Vec<_> = model
        .params()
        .trainable()
        .into_iter()
        .map(|(n, v)| (n, v, c.weight_decay))
        .collect();
    params.extend(proj.trainable().into_iter().map(|(n, v)| (n, v, 0.0)));
    let mut opt = Adam::new(params, s.lr, Decay::L2)?;
    let t0 = std::time::Instant::now();
    let mut losses = Vec::new();
    let steps = rows.len().div_ceil(s.batch_size);
    let pb = Progress::new(s.epochs * steps, "step", "ctrl: stage 1".into(), quiet);
    for epoch in 0..s.epochs {
        let mut rng = ChaCha8Rng::seed_from_u64(collm_nn::run::epoch_seed(c.seed ^ 0xc7e1, epoch));
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.shuffle(&mut rng);
        let ctx = TrainCtx::new(rng.gen());
        let (mut sum, mut n) = (0.0, 0usize);
        for chunk in order.chunks(s.batch_size) {
            collm_core::progress::check()?;
            if chunk.len() < 2 {
                continue; // no negative in a batch of one
            }
            let batch: Vec<&Interaction> = chunk.iter().map(|&k| &rows[k]).collect();
            let b = CfBatch::new(&batch, model.history_len(), &dev)?;
            let u = model.forward(&b, Some(&ctx))?.user;
            let idx = Tensor::from_vec(
                chunk.iter().map(|&k| k as u32).collect::<Vec<_>>(),
                chunk.len(),
                &dev,
            )?;
            let t = texts.index_select(&idx, 0)?;
            let a = sub_spaces(&to_shared_cf.forward(&u)?, s.sub_spaces)?;
            let z = sub_spaces(&to_shared_text.forward(&t)?, s.sub_spaces)?;
            let loss = info_nce(&a, &z, s.temperature)?;
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                bail!(
                    "ctrl stage 1, epoch {}: the loss is {l}; lower ctrl.lr",
                    epoch + 1
                );
            }
            opt.step(&loss.backward()?)?;
            sum += l;
            n += 1;
            pb.inc(1)?;
        }
        let mean = sum / n.max(1) as f64;
        tracing::info!("ctrl stage 1, epoch {}: InfoNCE {mean:.4}", epoch + 1);
        losses.push(mean);
    }
    pb.finish_and_clear();
    // Everything but the head goes on to stage 2.
    let carried: Vec<(String, Tensor)> = model
        .params()
        .trainable()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("mlp."))
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let tmp = dir.join(format!(".{STAGE1}.tmp"));
    candle_core::safetensors::save(&carried.iter().cloned().collect(), &tmp)?;
    std::fs::rename(&tmp, dir.join(STAGE1))?;
    crash_point();
    let done = Stage1 {
        settings: s.clone(),
        cf: c.clone(),
        loss: losses,
        seconds: t0.elapsed().as_secs_f64(),
        carried: carried.into_iter().map(|(n, _)| n).collect(),
    };
    write_file_atomic(
        &dir.join(STAGE1_DONE),
        serde_json::to_string_pretty(&done)?.as_bytes(),
    )?;
    Ok(done)
}

/// Trains CTRL into `out`: stage 1 into `out/ctrl/` (skipped when done there with these
/// settings), then stage 2, the collaborative run itself, in `out`. `resume` continues a run
/// in either stage (stage 1 restarts its epochs, from the cached text encodings); `force`
/// removes the run `out` holds first.
pub fn train(cfg: &CtrlConfig, ds: &Dataset, out: &Path, opts: &CfOptions) -> Result<TrainMetrics> {
    cfg.validate()?;
    let dir = out.join(CTRL_DIR);
    let holds = out.join(collm_cf::run::CONFIG_FILE).exists() || dir.exists();
    if opts.force && opts.resume {
        bail!("--resume and --force exclude each other");
    }
    if holds && !opts.resume && !opts.force {
        bail!(
            "{}: already holds a CTRL run (pass --resume to continue it, --force to replace it, or choose another --out)",
            out.display()
        );
    }
    if opts.force && holds {
        std::fs::remove_dir_all(out)
            .with_context(|| format!("{}: cannot remove", out.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    // One writer at a time in stage 1 (stage 2's run directory takes the same lock itself).
    let lock = collm_core::io::OutputLock::acquire(out)?;
    let done = std::fs::read_to_string(dir.join(STAGE1_DONE))
        .ok()
        .and_then(|t| serde_json::from_str::<Stage1>(&t).ok())
        .filter(|d| d.settings == cfg.ctrl && d.cf == cfg.cf && dir.join(STAGE1).is_file());
    let stage1_done = match done {
        Some(d) => d,
        None => {
            if out.join(collm_cf::run::CONFIG_FILE).exists() {
                bail!(
                    "{}: stage 2 has started over other stage-1 settings than these; resume with the same config or --force",
                    out.display()
                );
            }
            stage1(cfg, ds, &dir, opts.quiet)?
        }
    };
    drop(lock);
    tracing::info!(
        "ctrl stage 1: InfoNCE {:?} in {:.0} s; stage 2 (the collaborative model with a new head)",
        stage1_done.loss,
        stage1_done.seconds
    );
    let stage2 = CfOptions {
        resume: out.join(collm_cf::run::CONFIG_FILE).exists(),
        force: false,
        quiet: opts.quiet,
        init: Some(("ctrl stage 1".into(), dir.join(STAGE1))),
    };
    collm_cf::train::train(&cfg.cf, ds, out, &stage2)
}

/// The axes of a CTRL sweep (`collm train ctrl-sweep`): an empty axis keeps the base config's
/// value.
#[derive(Debug, Clone, Default)]
pub struct SweepGrid {
    pub sub_spaces: Vec<usize>,
    pub batch_sizes: Vec<usize>,
    pub epochs: Vec<usize>,
}

/// One point of a CTRL sweep: its stage-1 settings, stage 1's last InfoNCE, stage 2's best
/// epoch and valid metrics.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub name: String,
    pub sub_spaces: usize,
    pub batch_size: usize,
    pub epochs: usize,
    pub stage1_loss: Option<f64>,
    pub best_epoch: Option<usize>,
    pub valid_auc: Option<f64>,
    pub valid_uauc: Option<f64>,
}

/// Trains every point of `grid` over `base` as a full CTRL run under `out/runs/` (finished and
/// interrupted points resume), selecting by valid AUC. The train rows' text encodings are
/// computed once, into `out/texts/`, and linked into each run. Writes `results.tsv`,
/// `results.md` and `best.toml` (the best point's config) into `out`; returns the points best
/// first. Every point's config is checked before anything trains.
pub fn sweep(
    base: &CtrlConfig,
    grid: &SweepGrid,
    ds: &Dataset,
    out: &Path,
    quiet: bool,
) -> Result<Vec<SweepPoint>> {
    let axis = |v: &[usize], base: usize| if v.is_empty() { vec![base] } else { v.to_vec() };
    let mut configs = Vec::new();
    for m in axis(&grid.sub_spaces, base.ctrl.sub_spaces) {
        for b in axis(&grid.batch_sizes, base.ctrl.batch_size) {
            for e in axis(&grid.epochs, base.ctrl.epochs) {
                let mut cfg = base.clone();
                (cfg.ctrl.sub_spaces, cfg.ctrl.batch_size, cfg.ctrl.epochs) = (m, b, e);
                let name = format!("ctrl-m{m}-b{b}-e{e}");
                cfg.validate()
                    .with_context(|| format!("sweep point {name}"))?;
                configs.push((name, cfg));
            }
        }
    }
    let texts = out.join("texts");
    std::fs::create_dir_all(&texts)
        .with_context(|| format!("{}: cannot create", texts.display()))?;
    let rows = ds.train()?.rows.clone();
    text_encodings(&base.ctrl, ds, &rows, &texts, quiet, &device())?;
    let mut points = Vec::new();
    for (name, cfg) in configs {
        let run = out.join("runs").join(&name);
        let dir = run.join(CTRL_DIR);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        // The cache before its key: a key names a complete cache.
        for f in [TEXTS, TEXTS_KEY] {
            let (from, to) = (texts.join(f), dir.join(f));
            if !to.exists() && std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).with_context(|| {
                    format!("{}: cannot copy to {}", from.display(), to.display())
                })?;
            }
        }
        tracing::info!("ctrl sweep point {name}");
        let opts = CfOptions {
            resume: true,
            quiet,
            ..Default::default()
        };
        let m = train(&cfg, ds, &run, &opts)?;
        let stage1: Option<Stage1> = std::fs::read_to_string(dir.join(STAGE1_DONE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let best = m.best_valid.as_ref();
        points.push((
            cfg.clone(),
            SweepPoint {
                name,
                sub_spaces: cfg.ctrl.sub_spaces,
                batch_size: cfg.ctrl.batch_size,
                epochs: cfg.ctrl.epochs,
                stage1_loss: stage1.and_then(|s| s.loss.last().copied()),
                best_epoch: m.best_epoch,
                valid_auc: best.and_then(|r| r.auc),
                valid_uauc: best.and_then(|r| r.uauc),
            },
        ));
    }
    let f = collm_metrics::fmt_metric;
    collm_cf::sweep::write_results(
        out,
        &[
            ("name", "run"),
            ("sub_spaces", "M"),
            ("batch_size", "batch"),
            ("epochs", "epochs"),
            ("stage1_infonce", "stage-1 InfoNCE"),
            ("best_epoch", "best epoch"),
            ("valid_auc", "valid AUC"),
            ("valid_uauc", "valid UAUC"),
        ],
        &mut points,
        |p| p.valid_auc,
        |p| {
            vec![
                p.name.clone(),
                p.sub_spaces.to_string(),
                p.batch_size.to_string(),
                p.epochs.to_string(),
                p.stage1_loss.map_or("-".into(), |l| format!("{l:.4}")),
                p.best_epoch.unwrap_or(0).to_string(),
                f(p.valid_auc),
                f(p.valid_uauc),
            ]
        },
        |cfg| Ok(toml::to_string(cfg)?),
    )?;
    Ok(points.into_iter().map(|(_, p)| p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fine_grained_similarity_sums_each_sub_space_best_match() {
        let dev = Device::Cpu;
        // a: one row, sub-spaces (1, 0) and (0, 1); b: two rows.
        let a = Tensor::new(&[[[1f32, 0.], [0., 1.]]], &dev).unwrap();
        let b = Tensor::new(&[[[0.5f32, 0.5], [1., 0.]], [[0., -1.], [0., 0.2]]], &dev).unwrap();
        let s = similarity(&a, &b).unwrap().to_vec2::<f32>().unwrap();
        // row 0 of b: m=0 best is (1,0)·(1,0) = 1, m=1 best is (0,1)·(.5,.5) = .5 → 1.5
        // row 1 of b: m=0: max(0, 0) = 0; m=1: max(-1, .2) = .2 → 0.2
        assert_eq!(s, vec![vec![1.5, 0.2]]);
        let back = similarity(&b, &a).unwrap().to_vec2::<f32>().unwrap();
        // b row 0 vs a: (.5,.5)→.5, (1,0)→1 → 1.5; b row 1: (0,-1)→0, (0,.2)→.2 → .2
        assert_eq!(back, vec![vec![1.5], vec![0.2]]);
    }

    #[test]
    fn info_nce_gradients_agree_with_finite_differences() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let vals: Vec<f32> = (0..3 * 8).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let other: Vec<f32> = (0..3 * 8).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let x = candle_core::Var::from_vec(vals.clone(), (3, 8), &dev).unwrap();
        let z = sub_spaces(&Tensor::from_vec(other, (3, 8), &dev).unwrap(), 2).unwrap();
        let loss = |x: &Tensor| info_nce(&sub_spaces(x, 2).unwrap(), &z, 0.7).unwrap();
        let g = loss(x.as_tensor())
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let eps = 1e-3f32;
        for k in 0..vals.len() {
            let at = |d: f32| {
                let mut v = vals.clone();
                v[k] += d;
                loss(&Tensor::from_vec(v, (3, 8), &dev).unwrap())
                    .to_scalar::<f32>()
                    .unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!((fd - g[k]).abs() < 2e-3, "[{k}]: {fd} vs {}", g[k]);
        }
        // Matching pairs score lower: the loss of a side with itself beats a shuffled one.
        let same = info_nce(&z, &z, 0.7).unwrap().to_scalar::<f32>().unwrap();
        let idx = Tensor::new(&[1u32, 2, 0], &dev).unwrap();
        let shuffled = info_nce(&z.index_select(&idx, 0).unwrap(), &z, 0.7)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(same < shuffled, "{same} vs {shuffled}");
    }

    #[test]
    fn a_row_reads_as_the_papers_text() {
        let titles: Vec<String> = ["", "Heat", "Casino", "Up"].map(String::from).to_vec();
        let r = Interaction {
            uid: 1,
            iid: 3,
            label: 1,
            timestamp: 0,
            history: vec![1, 2, 1],
        };
        assert_eq!(
            row_text(&r, &titles, 2),
            "This is a user, who has recently watched Casino|Heat. This is a movie, title is Up."
        );
    }
}
