//! The tiny run family the tests of this crate, of `collm-serve` and of `collm-cli` train on,
//! built in one place (behind the `testing` feature; not part of the API): a random backbone
//! ([`collm_llm::testing`]), a synthetic dataset, collaborative runs, a step-1 (TALLRec) run and
//! step-2 runs, each trained in seconds. A test file keeps one family in a `OnceLock` and its
//! tests share it:
//!
//! ```text
//! fn family() -> &'static Family {
//!     static F: OnceLock<Family> = OnceLock::new();
//!     F.get_or_init(|| Family::build(Spec::default()).unwrap())
//! }
//! ```
//!
//! Layout under [`Family::root`]: `backbone/`, `data/`, `cf-<model>/` per collaborative model,
//! `step1/` (TALLRec), `<mode>/` per step-2 mode.

use crate::experiment::{ExperimentConfig, Mode};
use crate::train::{train, TrainOptions};
use anyhow::Result;
use collm_cf::train::{train as train_cf, TrainOptions as CfOptions};
use collm_cf::{CfConfig, ModelKind};
use collm_data::dataset::write_dataset;
use collm_data::sources::synthetic::{prepare, SyntheticOptions};
use collm_data::Dataset;
use std::path::{Path, PathBuf};

/// What a family holds and how big it is. [`Spec::default`] is the smallest useful one: 20
/// users and 40 items, MF, TALLRec and CoLLM-MF, two optimizer steps each.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The random backbone's seed ([`collm_llm::testing::write_tiny_backbone`]).
    pub backbone_seed: u64,
    pub data: SyntheticOptions,
    /// Write `data/` without its test split (as the shipped ML-1M split), for tests that add
    /// it later ([`Family::full_data`] writes the data with it).
    pub without_test: bool,
    /// The collaborative models to train, each from [`Spec::cf_config`].
    pub cf: Vec<ModelKind>,
    pub cf_dim: usize,
    /// DIN's MLP and SASRec's length (unused by MF and LightGCN).
    pub cf_hidden: Vec<usize>,
    pub cf_max_len: usize,
    pub cf_epochs: usize,
    /// Train step 1 (TALLRec) into `step1/`.
    pub step1: bool,
    /// Step-2 modes to train (each into `<mode>/`), over `cf-mf` and `step1`.
    pub step2: Vec<Mode>,
    /// Optimizer steps, validation interval and rows, batch size of every LLM run.
    pub steps: usize,
    pub eval_every: usize,
    pub eval_rows: usize,
    pub batch_size: usize,
    /// `None`: the config's defaults.
    pub warmup_steps: Option<usize>,
    pub lr: Option<f64>,
    pub eval_batch_size: Option<usize>,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            backbone_seed: 1,
            data: SyntheticOptions {
                users: 20,
                items: 40,
                rows_per_user: 6.0,
                seed: 3,
                ..Default::default()
            },
            without_test: false,
            cf: vec![ModelKind::Mf],
            cf_dim: 8,
            cf_hidden: vec![8],
            cf_max_len: 4,
            cf_epochs: 1,
            step1: true,
            step2: vec![Mode::Collm],
            steps: 2,
            eval_every: 2,
            eval_rows: 8,
            batch_size: 4,
            warmup_steps: None,
            lr: None,
            eval_batch_size: Some(8),
        }
    }
}

impl Spec {
    /// The config of collaborative model `model`.
    pub fn cf_config(&self, model: ModelKind) -> CfConfig {
        CfConfig {
            dim: self.cf_dim,
            hidden: self.cf_hidden.clone(),
            max_len: self.cf_max_len,
            max_epochs: self.cf_epochs,
            ..CfConfig::defaults(model)
        }
    }
}

/// A built family in its own temporary directory (removed when the family is dropped).
pub struct Family {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub spec: Spec,
    pub ds: Dataset,
}

/// Options of a fresh, quiet training run (the tests' default).
pub fn quiet() -> TrainOptions {
    TrainOptions {
        quiet: true,
        ..TrainOptions::default()
    }
}

impl Family {
    /// Writes the backbone and the dataset, then trains what `spec` lists, in order.
    pub fn build(spec: Spec) -> Result<Family> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().to_path_buf();
        collm_llm::testing::write_tiny_backbone(&root.join("backbone"), spec.backbone_seed)?;
        let mut data = prepare(&spec.data)?;
        if spec.without_test {
            data.splits.retain(|s| s.name != "test");
        }
        write_dataset(data, &root.join("data"), false)?;
        let ds = Dataset::load(&root.join("data"))?;
        let f = Family {
            _tmp: tmp,
            root,
            spec,
            ds,
        };
        let cf_quiet = CfOptions {
            quiet: true,
            ..CfOptions::default()
        };
        for &model in &f.spec.cf {
            train_cf(&f.spec.cf_config(model), &f.ds, &f.cf_run(model), &cf_quiet)?;
        }
        if f.spec.step1 {
            train(&f.config(Mode::Tallrec), &f.step1(), &quiet())?;
        }
        for &mode in &f.spec.step2 {
            train(&f.config(mode), &f.run(mode), &quiet())?;
        }
        Ok(f)
    }

    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Writes the family's data with its test split added to `dir`: the rows of users that the
    /// train and valid splits hold (a user first seen in test would have no embedding in
    /// models trained without it, and is refused).
    pub fn full_data(&self, dir: &Path) -> Result<Dataset> {
        let mut data = prepare(&self.spec.data)?;
        let known = data
            .splits
            .iter()
            .filter(|s| s.name != "test")
            .flat_map(|s| s.rows.iter().map(|r| r.uid))
            .max()
            .unwrap_or(0);
        for s in &mut data.splits {
            if s.name == "test" {
                s.rows.retain(|r| r.uid <= known);
            }
        }
        write_dataset(data, dir, false)
    }

    pub fn backbone(&self) -> PathBuf {
        self.root.join("backbone")
    }

    /// The run of collaborative model `model`.
    pub fn cf_run(&self, model: ModelKind) -> PathBuf {
        self.root.join(format!("cf-{model}"))
    }

    /// The step-1 (TALLRec) run.
    pub fn step1(&self) -> PathBuf {
        self.root.join("step1")
    }

    /// The run of step-2 mode `mode` (when the spec trained it).
    pub fn run(&self, mode: Mode) -> PathBuf {
        self.root.join(mode.name())
    }

    /// The family's config for `mode` (named after it): its data and backbone, `cf-mf` and
    /// `step1`, a mapper of multiplier 2 and the spec's tiny budget.
    pub fn config(&self, mode: Mode) -> ExperimentConfig {
        let s = &self.spec;
        let mut c = ExperimentConfig::new(mode, &self.data(), &self.backbone());
        c.name = mode.name().into();
        c.model.cf_run = Some(self.cf_run(ModelKind::Mf));
        c.model.step1 = Some(self.step1());
        c.model.mapper_mult = 2;
        if let Some(b) = s.eval_batch_size {
            c.model.eval_batch_size = b;
        }
        let t = &mut c.training;
        (t.max_steps, t.eval_every, t.eval_rows) = (s.steps, s.eval_every, s.eval_rows);
        t.batch_size = s.batch_size;
        if let Some(w) = s.warmup_steps {
            t.warmup_steps = w;
        }
        if let Some(lr) = s.lr {
            t.lr = lr;
        }
        c
    }
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}
