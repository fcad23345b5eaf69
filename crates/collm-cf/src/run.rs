//! A run directory: everything needed to rebuild, evaluate or resume a trained model.
//!
//! ```text
//! RUN/
//!   config.toml          [cf]: the model's config; [data]: the dataset it was trained on
//!                        (name, path, content_sha256, num_users, num_items)
//!   model.safetensors    the best weights (by valid AUC)
//!   weights.sha256.json  model.safetensors's SHA-256, written with it and checked at load
//!                        (runs written before it was kept have none and load as before)
//!   metrics.json         the training curve and the best valid report
//!   checkpoint/          the last epoch's weights, optimizer state and loop state (--resume),
//!                        committed as a whole (`collm_nn::run`)
//! ```
//! Evaluating a run on another dataset than the one it was trained on is an error.

use crate::{build_model, CfConfig, CollaborativeModel};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use collm_data::dataset::TrainedOn;
use collm_data::Dataset;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const CONFIG_FILE: &str = "config.toml";
pub const MODEL_FILE: &str = "model.safetensors";
pub const METRICS_FILE: &str = "metrics.json";
/// The weights manifest: `{"model.safetensors": sha256}`.
pub const WEIGHTS_MANIFEST: &str = "weights.sha256.json";

/// Records the SHA-256 of the run's `model.safetensors` (after every save of it).
pub fn write_weights_manifest(run: &Path) -> Result<()> {
    let sha = collm_core::io::sha256_file(&run.join(MODEL_FILE))?;
    let map: std::collections::BTreeMap<&str, String> = [(MODEL_FILE, sha)].into();
    collm_core::io::write_file_atomic(
        &run.join(WEIGHTS_MANIFEST),
        serde_json::to_string_pretty(&map)?.as_bytes(),
    )
}

/// Checks the run's `model.safetensors` against its manifest (none: a run written before it
/// was kept, loaded as before).
pub fn check_weights_manifest(run: &Path) -> Result<()> {
    let p = run.join(WEIGHTS_MANIFEST);
    if !p.is_file() {
        return Ok(());
    }
    let want: std::collections::BTreeMap<String, String> = serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?,
    )
    .with_context(|| format!("{}: invalid", p.display()))?;
    let Some(sha) = want.get(MODEL_FILE) else {
        bail!("{}: no entry for {MODEL_FILE}", p.display());
    };
    let weights = run.join(MODEL_FILE);
    let have = collm_core::io::sha256_file(&weights)?;
    if &have != sha {
        bail!(
            "{}: changed since the run wrote it (sha256 {}, recorded {} in {WEIGHTS_MANIFEST}): the run's weights were replaced or edited",
            weights.display(),
            &have[..12],
            &sha[..12.min(sha.len())]
        );
    }
    Ok(())
}

/// The dataset a run was trained on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataRef {
    pub name: String,
    pub path: String,
    pub content_sha256: String,
    pub num_users: usize,
    pub num_items: usize,
    /// The SHA-256 of items.tsv and of each split (absent in runs written before it was
    /// recorded): the run evaluates on the same data with splits added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_sha256: Option<std::collections::BTreeMap<String, String>>,
}

impl DataRef {
    pub fn of(ds: &Dataset) -> Self {
        Self {
            name: ds.manifest.name.clone(),
            path: ds.display_name(),
            content_sha256: ds.manifest.content_sha256.clone(),
            num_users: ds.num_users(),
            num_items: ds.num_items(),
            files_sha256: ds.manifest.trained_file_hashes(),
        }
    }

    /// Errors unless `ds` holds the data this reference names: the same content, or the same
    /// items and train split with splits added (see [`Dataset::check_trained_on`]).
    pub fn check(&self, ds: &Dataset, what: &str) -> Result<()> {
        ds.check_trained_on(
            &TrainedOn {
                content_sha256: &self.content_sha256,
                files: self.files_sha256.as_ref(),
                sizes: Some((self.num_users, self.num_items)),
            },
            "the run",
        )
        .with_context(|| {
            format!(
                "{what} was trained on dataset '{}' ({})",
                self.name, self.path
            )
        })
    }
}

/// Weights a run started from instead of a fresh initialisation (some of its parameters).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InitRef {
    /// What made them (e.g. "ctrl stage 1").
    pub what: String,
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
    pub cf: CfConfig,
    pub data: DataRef,
    /// Absent: every parameter initialised fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitRef>,
}

impl RunConfig {
    pub fn load(run: &Path) -> Result<Self> {
        let path = run.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: cannot read (is {} a run directory made by `collm train cf`?)",
                path.display(),
                run.display()
            )
        })?;
        let cfg: RunConfig = toml::from_str(&text)
            .with_context(|| format!("{}: invalid run config", path.display()))?;
        cfg.cf
            .validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    pub fn save(&self, run: &Path) -> Result<()> {
        collm_core::io::write_file_atomic(&run.join(CONFIG_FILE), toml::to_string(self)?.as_bytes())
    }
}

/// Loads a trained model from its run directory, checking that `ds` is its dataset.
pub fn load_model(
    run: &Path,
    ds: &Dataset,
    device: &Device,
) -> Result<(RunConfig, Box<dyn CollaborativeModel>)> {
    let cfg = RunConfig::load(run)?;
    cfg.data.check(ds, &format!("run {}", run.display()))?;
    let model = build_model(&cfg.cf, ds, device)?;
    let weights = run.join(MODEL_FILE);
    if !weights.is_file() {
        bail!(
            "{}: not found (the run has no saved model yet: did its training finish an epoch?)",
            weights.display()
        );
    }
    check_weights_manifest(run)?;
    model.params().load(&weights)?;
    Ok((cfg, model))
}
