//! The engine's long jobs from Python: training (CF and CoLLM), preparing a dataset, the report.

use crate::bridge::blocking;
use crate::convert::{json_to_py, table_from_json};
use crate::errors::{config_err, py_err};
use anyhow::{bail, Context, Result};
use collm_core::io::InputError;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use std::path::PathBuf;

/// Trains a collaborative model (`collm train cf`); returns its metrics.json as a dict.
#[pyfunction]
#[pyo3(signature = (data, out, config_json, resume=false, force=false, progress=None))]
pub(crate) fn _train_cf(
    py: Python<'_>,
    data: PathBuf,
    out: PathBuf,
    config_json: String,
    resume: bool,
    force: bool,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let metrics = blocking(py, progress, move || {
        let t = table_from_json(&config_json, "config")?;
        let text = toml::to_string(&t).context("config")?;
        let cfg = collm_cf::CfConfig::from_toml(&text, "config").map_err(config_err)?;
        let ds = collm_data::Dataset::load(&data)?;
        collm_cf::train::train(
            &cfg,
            &ds,
            &out,
            &collm_cf::train::TrainOptions {
                resume,
                force,
                quiet: false,
                init: None,
            },
        )
    })?;
    json_to_py(py, &metrics)
}

/// Reads a collaborative-model config file into JSON text (the Python side merges overrides).
#[pyfunction]
pub(crate) fn _cf_config_json(path: PathBuf) -> PyResult<String> {
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))
        .map_err(py_err)?;
    let t: toml::Table = toml::from_str(&text)
        .map_err(|e| InputError(format!("{}: {e}", path.display())))
        .map_err(|e| py_err(e.into()))?;
    serde_json::to_string(&t).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Trains a CoLLM run (`collm train collm`) from a config file or a mapping (JSON text);
/// returns its metrics.json as a dict.
#[pyfunction]
#[pyo3(signature = (config, config_json, out, resume=false, force=false, progress=None))]
pub(crate) fn _train(
    py: Python<'_>,
    config: Option<PathBuf>,
    config_json: Option<String>,
    out: PathBuf,
    resume: bool,
    force: bool,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let state = blocking(py, progress, move || {
        let cfg = match (config, config_json) {
            (Some(p), None) => collm::ExperimentConfig::load(&p),
            (None, Some(j)) => table_from_json(&j, "config").and_then(|t| {
                let c = collm::ExperimentConfig::from_table(t, "config")?;
                c.validate().context("config")?;
                Ok(c)
            }),
            _ => bail!("give a config file or a mapping"),
        }
        .map_err(config_err)?;
        collm::train::train(
            &cfg,
            &out,
            &collm::train::TrainOptions {
                resume,
                force,
                quiet: false,
                stop_after: None,
            },
        )
    })?;
    json_to_py(py, &state)
}

/// Prepares a dataset directory (`collm data prepare SOURCE`); options as JSON text.
#[pyfunction]
#[pyo3(signature = (source, out, options_json, force=false, progress=None))]
pub(crate) fn _prepare(
    py: Python<'_>,
    source: String,
    out: PathBuf,
    options_json: String,
    force: bool,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    use collm_data::sources::{amazon, synthetic, Source};
    let manifest = blocking(py, progress, move || {
        let o: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&options_json).context("options")?;
        let mut o = Opts(o);
        let src = match source.as_str() {
            "ml-1m" => Source::Ml1m {
                raw: o.path("raw")?,
            },
            "amazon-book" => Source::AmazonBook {
                reviews: o.path("reviews")?,
                meta: o.path("meta")?,
                options: amazon::AmazonOptions {
                    year: o.get("year")?.unwrap_or(2017),
                    activity_threshold: o.get("activity_threshold")?.unwrap_or(20),
                },
            },
            "collm-tsv" => Source::CollmTsv {
                input: o.path("input")?,
                name: o.get("name")?,
                item_noun: o.get("item_noun")?.unwrap_or_else(|| "movie".into()),
            },
            "synthetic" => {
                let d = synthetic::SyntheticOptions::default();
                Source::Synthetic(synthetic::SyntheticOptions {
                    users: o.get("users")?.unwrap_or(d.users),
                    items: o.get("items")?.unwrap_or(d.items),
                    rows_per_user: o.get("rows_per_user")?.unwrap_or(d.rows_per_user),
                    factors: o.get("factors")?.unwrap_or(d.factors),
                    title_words: o.get("title_words")?.unwrap_or(d.title_words),
                    semantic_weight: o.get("semantic_weight")?.unwrap_or(d.semantic_weight),
                    taste_weight: o.get("taste_weight")?.unwrap_or(d.taste_weight),
                    collaborative_weight: o
                        .get("collaborative_weight")?
                        .unwrap_or(d.collaborative_weight),
                    train_until: o.get("train_until")?.unwrap_or(d.train_until),
                    valid_until: o.get("valid_until")?.unwrap_or(d.valid_until),
                    seed: o.get("seed")?.unwrap_or(d.seed),
                })
            }
            other => {
                return Err(InputError(format!(
                    "unknown source {other:?}: choose ml-1m, amazon-book, collm-tsv or synthetic"
                ))
                .into())
            }
        };
        o.finish(&source)?;
        Ok(collm_data::sources::prepare(&src, &out, force)?.manifest)
    })?;
    json_to_py(py, &manifest)
}

/// A source's options, each taken once; what is left over is refused by name.
struct Opts(serde_json::Map<String, serde_json::Value>);

impl Opts {
    fn get<T: serde::de::DeserializeOwned>(&mut self, k: &str) -> Result<Option<T>> {
        match self.0.remove(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| InputError(format!("option {k}={v}: {e}")).into()),
        }
    }
    fn path(&mut self, k: &str) -> Result<PathBuf> {
        self.get::<String>(k)?
            .map(PathBuf::from)
            .ok_or_else(|| InputError(format!("option {k}= is required")).into())
    }
    fn finish(self, source: &str) -> Result<()> {
        if let Some(k) = self.0.keys().next() {
            return Err(InputError(format!("source {source} has no option {k:?}")).into());
        }
        Ok(())
    }
}

/// `collm report`: the markdown table of `runs` on `split` (and with `out` its files), from
/// the scores beside each run unless `rescore`.
#[pyfunction]
#[pyo3(signature = (runs, data=None, split="valid", out=None, rescore=false, progress=None))]
pub(crate) fn report(
    py: Python<'_>,
    runs: Vec<PathBuf>,
    data: Option<PathBuf>,
    split: &str,
    out: Option<PathBuf>,
    rescore: bool,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<String> {
    let split = split.to_string();
    let scores = if rescore {
        collm::pipeline::Scores::Evaluate
    } else {
        collm::pipeline::Scores::Shipped
    };
    blocking(py, progress, move || {
        collm::pipeline::report(&runs, data.as_deref(), &split, out.as_deref(), scores)
    })
}
