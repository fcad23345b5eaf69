//! One TOML file per run: dataset, backbone, collaborative run, mode, hyperparameters, seed.
//!
//! ```toml
//! mode = "collm"                 # icl | tallrec | collm | t1 | t2 | t3 | softprompt | uitoken
//! data = "data/ml-1m-collm"
//! backbone = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! cf_run = "runs/ml-1m/mf"       # collm, t1, t2 (its config), t3
//! step1 = "runs/ml-1m/tallrec"   # the step-1 (TALLRec) run whose LoRA is loaded, frozen
//! lr = 1e-3
//! ```

use anyhow::{bail, Context, Result};
use collm_llm::LoraConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Base LLM, text-only prompt, no training.
    Icl,
    /// Step 1: LoRA on text-only prompts (= TALLRec = "w/o CIE").
    Tallrec,
    /// Step 2 (default CoLLM): the mapper only; pretrained CF, LLM and step-1 LoRA frozen.
    Collm,
    /// Step 2 with the mapper and the CF model tuned, CF initialised from its run.
    T1,
    /// Step 2 with the mapper and the CF model tuned, CF from scratch.
    T2,
    /// One step: LoRA + mapper from the start, CF frozen.
    T3,
    /// Soft-Prompt baseline: k vectors shared by all users / all items, trained with LoRA.
    Softprompt,
    /// "w/ UI-token": a free embedding per user and item instead of the CIE (step-1 LoRA frozen).
    Uitoken,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
                format!("unknown mode '{s}' (one of {})", names.join(", "))
            })
    }
}

impl Mode {
    pub const ALL: [Mode; 8] = [
        Mode::Icl,
        Mode::Tallrec,
        Mode::Collm,
        Mode::T1,
        Mode::T2,
        Mode::T3,
        Mode::Softprompt,
        Mode::Uitoken,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Icl => "icl",
            Mode::Tallrec => "tallrec",
            Mode::Collm => "collm",
            Mode::T1 => "t1",
            Mode::T2 => "t2",
            Mode::T3 => "t3",
            Mode::Softprompt => "softprompt",
            Mode::Uitoken => "uitoken",
        }
    }
    pub fn default_template(self) -> &'static str {
        match self {
            Mode::Icl => "icl",
            Mode::Tallrec => "tallrec",
            Mode::Softprompt => "softprompt",
            Mode::Uitoken => "uitoken",
            _ => "collm",
        }
    }
    pub fn uses_cf(self) -> bool {
        matches!(self, Mode::Collm | Mode::T1 | Mode::T2 | Mode::T3)
    }
    pub fn needs_step1(self) -> bool {
        matches!(self, Mode::Collm | Mode::T1 | Mode::T2 | Mode::Uitoken)
    }
    pub fn trains_lora(self) -> bool {
        matches!(self, Mode::Tallrec | Mode::T3 | Mode::Softprompt)
    }
    pub fn trains(self) -> bool {
        self != Mode::Icl
    }
}

/// The backbone's weights and activations.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::Bf16 => candle_core::DType::BF16,
            Dtype::F16 => candle_core::DType::F16,
        }
    }
}

/// How a prompt's score (the click logit) is read from the answer position.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Score {
    /// The raw " Yes" logit (the reference).
    #[default]
    Yes,
    /// " Yes" minus " No": the logit of a two-way softmax.
    YesMinusNo,
}

fn d<T: Default>() -> T {
    T::default()
}

/// A CoLLM experiment, in the reference's spirit of `model:` / `datasets:` / `run:` sections:
///
/// ```toml
/// name = "collm-mf"        # optional (default: the file's stem)
/// mode = "collm"
/// seed = 42
/// [data]                   # what it learns from
/// path = "data/ml-1m-collm"
/// [model]                  # what is built: backbone, prompt, slots, LoRA, mapper, scoring
/// backbone = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
/// cf_run = "runs/ml-1m/cf-mf"
/// step1 = "runs/ml-1m/tallrec"
/// [model.lora]
/// r = 8
/// [training]               # how it is trained
/// lr = 1e-3
/// batch_size = 16
/// ```
/// Files in the flat layout of earlier versions (every field at the top) are still read: see
/// [`ExperimentConfig::from_table`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    #[serde(default = "d")]
    pub name: String,
    pub mode: Mode,
    /// Seeds the data order, dropout and every initialisation.
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    pub data: DataConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub training: TrainingConfig,
}

/// `[data]`: the dataset and how much of it is used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A dataset directory made by `collm data prepare`.
    pub path: PathBuf,
    /// Train on a seeded subsample of this many train rows (None = all).
    #[serde(default)]
    pub train_rows: Option<usize>,
}

/// `[model]`: the backbone, the prompt, what fills the ID slots, and how a score is read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub backbone: PathBuf,
    #[serde(default)]
    pub dtype: Dtype,
    /// Use only the first N decoder layers (a CPU speed knob; None = all).
    #[serde(default)]
    pub max_layers: Option<usize>,
    /// The collaborative model's run (`collm train cf`) for the CIE modes.
    #[serde(default)]
    pub cf_run: Option<PathBuf>,
    /// The step-1 run (`tallrec`) whose LoRA step 2 loads frozen.
    #[serde(default)]
    pub step1: Option<PathBuf>,
    /// Built-in template name or a file; default by mode.
    #[serde(default)]
    pub template: Option<String>,
    /// History titles shown in a prompt.
    #[serde(default = "defaults::history")]
    pub history: usize,
    /// Placeholder tokens per ID slot (k); default 1 (Soft-Prompt: 3).
    #[serde(default)]
    pub tokens_per_slot: Option<usize>,
    #[serde(default)]
    pub lora: LoraConfig,
    /// The mapper's hidden width multiplier m.
    #[serde(default = "defaults::mapper_mult")]
    pub mapper_mult: usize,
    #[serde(default = "defaults::yes")]
    pub answer_yes: String,
    #[serde(default = "defaults::no")]
    pub answer_no: String,
    /// "yes" (the reference: the raw " Yes" logit) or "yes_minus_no" (a two-way softmax).
    #[serde(default)]
    pub score: Score,
    /// Subtract a constant from every score: the mean raw score of the first 64 training rows
    /// under the initial weights, measured once when training starts. AUC is unchanged and BCE
    /// starts calibrated (SmolLM2-Instruct's raw " Yes" logit is ~15 on the quickstart
    /// prompts). Off by default, as in the reference: in one comparison (quickstart data, step
    /// 1, lr 1e-3, 96 steps) the raw logit reached valid AUC 0.633 and the calibrated 0.578.
    #[serde(default)]
    pub calibrate: bool,
    /// Prompts per forward pass when scoring.
    #[serde(default = "defaults::eval_batch")]
    pub eval_batch_size: usize,
    /// Shared-prefix scoring (`collm::score`): the suffixes (target title, item slot, answer
    /// cue) that one model call runs after a prefill are `eval_batch_size` rows, or more while
    /// their padded tokens stay within this many. 0: `eval_batch_size` rows. (One ML-1M user's
    /// 1,000 candidates through `/v1/score`: 13.6 s at 48 rows of ~20 tokens per call, 16.0 s
    /// at 16; Xeon, AMX kernel.)
    #[serde(default = "defaults::eval_suffix_tokens")]
    pub eval_suffix_tokens: usize,
}

/// `[training]`: optimizer, schedule, batches, validation and early stopping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    #[serde(default = "defaults::lr")]
    pub lr: f64,
    /// The cosine schedule's floor.
    #[serde(default = "defaults::min_lr")]
    pub min_lr: f64,
    /// AdamW weight decay, on ≥2-D weights only.
    #[serde(default = "defaults::wd")]
    pub weight_decay: f64,
    #[serde(default = "defaults::batch")]
    pub batch_size: usize,
    #[serde(default = "defaults::one")]
    pub grad_accum: usize,
    #[serde(default = "defaults::max_steps")]
    pub max_steps: usize,
    #[serde(default = "defaults::warmup")]
    pub warmup_steps: usize,
    /// Global gradient-norm clipping (0 = off).
    #[serde(default = "defaults::clip")]
    pub clip_norm: f64,
    /// Validate every this many optimizer steps.
    #[serde(default = "defaults::eval_every")]
    pub eval_every: usize,
    /// Size of the fixed valid subsample used for validation (0 = all of valid).
    #[serde(default = "defaults::eval_rows")]
    pub eval_rows: usize,
    /// Stop after this many validations without a better AUC.
    #[serde(default = "defaults::patience")]
    pub patience: usize,
    /// Group training batches by prompt length: each run of this many batches of the epoch's
    /// shuffled order is sorted by prompt length, cut into batches, and those batches are
    /// shuffled (seeded, so resume sees the same order). Less padding; 0 or 1 = off (plain
    /// shuffled batches, as the reference). Scoring always groups by length.
    #[serde(default)]
    pub length_buckets: usize,
    /// Also commit a checkpoint between validations once this many minutes have passed since
    /// the last one (0 = at validations only), so that a run killed at any moment loses at most
    /// that much work. How often a run checkpoints is not what it is: a run resumes with
    /// another value.
    #[serde(default = "defaults::checkpoint_minutes")]
    pub checkpoint_minutes: f64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        toml::Table::new()
            .try_into()
            .expect("every training field has a default")
    }
}

/// Where each field of the flat layout (before `[data]` / `[model]` / `[training]`) lives now.
const FLAT_FIELDS: [(&str, &str, &str); 30] = [
    ("data", "data", "path"),
    ("train_rows", "data", "train_rows"),
    ("backbone", "model", "backbone"),
    ("dtype", "model", "dtype"),
    ("max_layers", "model", "max_layers"),
    ("cf_run", "model", "cf_run"),
    ("step1", "model", "step1"),
    ("template", "model", "template"),
    ("history", "model", "history"),
    ("tokens_per_slot", "model", "tokens_per_slot"),
    ("lora", "model", "lora"),
    ("mapper_mult", "model", "mapper_mult"),
    ("answer_yes", "model", "answer_yes"),
    ("answer_no", "model", "answer_no"),
    ("score", "model", "score"),
    ("calibrate", "model", "calibrate"),
    ("eval_batch_size", "model", "eval_batch_size"),
    ("lr", "training", "lr"),
    ("min_lr", "training", "min_lr"),
    ("weight_decay", "training", "weight_decay"),
    ("batch_size", "training", "batch_size"),
    ("grad_accum", "training", "grad_accum"),
    ("max_steps", "training", "max_steps"),
    ("warmup_steps", "training", "warmup_steps"),
    ("clip_norm", "training", "clip_norm"),
    ("eval_every", "training", "eval_every"),
    ("eval_rows", "training", "eval_rows"),
    ("patience", "training", "patience"),
    ("length_buckets", "training", "length_buckets"),
    ("checkpoint_minutes", "training", "checkpoint_minutes"),
];

mod defaults {
    pub fn history() -> usize {
        10
    }
    pub fn mapper_mult() -> usize {
        10
    }
    pub fn lr() -> f64 {
        1e-3
    }
    pub fn wd() -> f64 {
        1e-3
    }
    pub fn batch() -> usize {
        8
    }
    pub fn one() -> usize {
        1
    }
    pub fn max_steps() -> usize {
        1000
    }
    pub fn warmup() -> usize {
        20
    }
    pub fn min_lr() -> f64 {
        1e-5
    }
    pub fn clip() -> f64 {
        1.0
    }
    pub fn eval_every() -> usize {
        50
    }
    pub fn checkpoint_minutes() -> f64 {
        15.0
    }
    pub fn eval_rows() -> usize {
        1000
    }
    pub fn patience() -> usize {
        5
    }
    pub fn seed() -> u64 {
        42
    }
    pub fn yes() -> String {
        " Yes".into()
    }
    pub fn no() -> String {
        " No".into()
    }
    pub fn eval_batch() -> usize {
        16
    }
    pub fn eval_suffix_tokens() -> usize {
        1024
    }
}

impl ExperimentConfig {
    /// A config with every field at its default; set fields in Rust, then [`Self::validate`].
    pub fn new(mode: Mode, data: &Path, backbone: &Path) -> Self {
        let mut t = toml::Table::new();
        t.insert("mode".into(), mode.name().into());
        t.insert("data".into(), data.display().to_string().into());
        t.insert("backbone".into(), backbone.display().to_string().into());
        Self::from_table(t, "defaults").expect("the defaults deserialize")
    }

    /// Reads a config from a TOML table: the nested layout, or the flat layout of earlier
    /// versions (every field at the top, `data` a path), which is moved into its sections
    /// first. `origin` names the source in errors. Not validated.
    pub fn from_table(mut t: toml::Table, origin: &str) -> Result<Self> {
        let flat = matches!(t.get("data"), Some(toml::Value::String(_)))
            || FLAT_FIELDS
                .iter()
                .any(|(k, _, _)| *k != "data" && t.contains_key(*k));
        if flat {
            for (key, section, field) in FLAT_FIELDS {
                if let Some(v) = t.remove(key) {
                    let sec = t
                        .entry(section)
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    let Some(sec) = sec.as_table_mut() else {
                        bail!("{origin}: '{section}' must be a table");
                    };
                    if sec.contains_key(field) {
                        bail!("{origin}: '{key}' is given both at the top and in [{section}]");
                    }
                    sec.insert(field.into(), v);
                }
            }
            tracing::debug!("{origin}: flat config layout, read into [data]/[model]/[training]");
        }
        t.try_into()
            .with_context(|| format!("{origin}: invalid experiment config"))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text)
            .with_context(|| format!("{}: invalid experiment config", path.display()))?;
        // A run's own config.toml (`[experiment]` + `[refs]`): its experiment is the config,
        // so "train this again" is `--config RUN/config.toml`.
        if table.contains_key("refs") && !table.contains_key("mode") {
            if let Some(toml::Value::Table(e)) = table.remove("experiment") {
                table = e;
            }
        }
        let mut c = Self::from_table(table, &path.display().to_string())?;
        if c.name.is_empty() {
            c.name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        c.validate().with_context(|| path.display().to_string())?;
        Ok(c)
    }

    pub fn template_name(&self) -> String {
        self.model
            .template
            .clone()
            .unwrap_or_else(|| self.mode.default_template().into())
    }

    pub fn k(&self) -> usize {
        self.model
            .tokens_per_slot
            .unwrap_or(if self.mode == Mode::Softprompt { 3 } else { 1 })
    }

    pub fn validate(&self) -> Result<()> {
        if self.mode.uses_cf() && self.model.cf_run.is_none() {
            bail!(
                "mode '{}' needs 'cf_run' (a run directory from `collm train cf`)",
                self.mode.name()
            );
        }
        if self.mode.needs_step1() && self.model.step1.is_none() {
            bail!(
                "mode '{}' needs 'step1' (the run directory of a 'tallrec' run, whose LoRA it loads frozen)",
                self.mode.name()
            );
        }
        if self.mode == Mode::Uitoken && self.k() != 1 {
            bail!("mode 'uitoken' uses one token per slot (tokens_per_slot = 1)");
        }
        for (name, v) in [
            ("batch_size", self.training.batch_size),
            ("grad_accum", self.training.grad_accum),
            ("eval_every", self.training.eval_every),
            ("history", self.model.history),
            ("mapper_mult", self.model.mapper_mult),
            ("eval_batch_size", self.model.eval_batch_size),
        ] {
            if v == 0 {
                bail!("'{name}' must be at least 1");
            }
        }
        for (name, v) in [
            ("max_steps", self.training.max_steps),
            ("patience", self.training.patience),
        ] {
            if v == 0 && self.mode.trains() {
                bail!("'{name}' must be at least 1 (a run that trains nothing is not a run)");
            }
        }
        use collm_core::fields::{check, End};
        let t = &self.training;
        check("lr", t.lr, End::Open(0.0), End::Closed(10.0))?;
        check("min_lr", t.min_lr, End::Closed(0.0), End::Closed(t.lr))?;
        check(
            "weight_decay",
            t.weight_decay,
            End::Closed(0.0),
            End::Closed(100.0),
        )?;
        check("clip_norm", t.clip_norm, End::Closed(0.0), End::None)?;
        check(
            "checkpoint_minutes",
            t.checkpoint_minutes,
            End::Closed(0.0),
            End::None,
        )?;
        if self.k() == 0 {
            bail!("'tokens_per_slot' must be at least 1");
        }
        self.model.lora.validate()?;
        Ok(())
    }

    /// Learning rate at optimizer step `t` (0-based): linear warm-up, then cosine to min_lr.
    pub fn lr_at(&self, t: usize) -> f64 {
        if t < self.training.warmup_steps {
            return self.training.lr * (t + 1) as f64 / self.training.warmup_steps as f64;
        }
        let span = self
            .training
            .max_steps
            .saturating_sub(self.training.warmup_steps)
            .max(1) as f64;
        let p = ((t - self.training.warmup_steps) as f64 / span).min(1.0);
        self.training.min_lr
            + 0.5
                * (self.training.lr - self.training.min_lr)
                * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ExperimentConfig> {
        let c = ExperimentConfig::from_table(toml::from_str(s)?, "test")?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn config_validation_names_the_problem() {
        let base = "data = \"d\"\nbackbone = \"b\"\n";
        assert!(parse(&format!("{base}mode = \"tallrec\"")).is_ok());
        let e = format!(
            "{:#}",
            parse(&format!("{base}mode = \"collm\"")).unwrap_err()
        );
        assert!(e.contains("needs 'cf_run'"), "{e}");
        let e = format!(
            "{:#}",
            parse(&format!("{base}mode = \"collm\"\ncf_run = \"r\"")).unwrap_err()
        );
        assert!(e.contains("needs 'step1'"), "{e}");
        assert!(parse(&format!("{base}mode = \"t4\"")).is_err());
        let e = format!(
            "{:#}",
            parse(&format!("{base}mode = \"tallrec\"\nlearning_rate = 1")).unwrap_err()
        );
        assert!(e.contains("unknown field"), "{e}");
        let e = format!(
            "{:#}",
            parse(&format!("{base}mode = \"tallrec\"\nscore = \"softmax\"")).unwrap_err()
        );
        assert!(e.contains("yes_minus_no") && e.contains("softmax"), "{e}");
        let e = format!(
            "{:#}",
            parse(&format!("{base}mode = \"tallrec\"\ndtype = \"f64\"")).unwrap_err()
        );
        assert!(e.contains("bf16") && e.contains("f64"), "{e}");
        let c = parse(&format!(
            "{base}mode = \"tallrec\"\ndtype = \"bf16\"\nscore = \"yes_minus_no\""
        ))
        .unwrap();
        assert_eq!(
            (c.model.dtype, c.model.score),
            (Dtype::Bf16, Score::YesMinusNo)
        );
        // Written back as the same words.
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("dtype = \"bf16\"") && text.contains("score = \"yes_minus_no\""));
        for (extra, what) in [
            ("max_steps = 0", "max_steps"),
            ("patience = 0", "patience"),
            ("clip_norm = -1.0", "clip_norm"),
            ("weight_decay = -0.1", "weight_decay"),
        ] {
            let e = format!(
                "{:#}",
                parse(&format!("{base}mode = \"tallrec\"\n{extra}")).unwrap_err()
            );
            assert!(e.contains(what), "{extra}: {e}");
        }
    }

    #[test]
    fn the_flat_layout_reads_as_the_nested_one() {
        let flat =
            "mode = \"collm\"\ndata = \"d\"\nbackbone = \"b\"\ncf_run = \"c\"\nstep1 = \"s\"\n\
lr = 0.01\nbatch_size = 4\ntrain_rows = 9\nhistory = 3\n[lora]\nr = 4\n";
        let nested = "mode = \"collm\"\n[data]\npath = \"d\"\ntrain_rows = 9\n\
[model]\nbackbone = \"b\"\ncf_run = \"c\"\nstep1 = \"s\"\nhistory = 3\n[model.lora]\nr = 4\n\
[training]\nlr = 0.01\nbatch_size = 4\n";
        let (a, b) = (parse(flat).unwrap(), parse(nested).unwrap());
        assert_eq!(a, b);
        assert_eq!(
            (a.training.lr, a.model.lora.r, a.data.train_rows),
            (0.01, 4, Some(9))
        );
        // Written in the nested layout, and read back the same.
        let text = toml::to_string(&a).unwrap();
        assert!(
            text.contains("[training]") && text.contains("[model.lora]"),
            "{text}"
        );
        assert_eq!(parse(&text).unwrap(), a);
        // A field in both places is an error, not a silent choice.
        let e = format!(
            "{:#}",
            parse("mode = \"tallrec\"\nlr = 1\n[data]\npath = \"d\"\n[model]\nbackbone = \"b\"\n[training]\nlr = 2\n")
                .unwrap_err()
        );
        assert!(e.contains("'lr' is given both"), "{e}");
        // Unknown fields are named in either layout.
        let e = format!("{:#}", parse(&format!("{nested}warmup = 3\n")).unwrap_err());
        assert!(e.contains("unknown field") && e.contains("warmup"), "{e}");
    }

    #[test]
    fn warmup_then_cosine() {
        let c = parse("data = \"d\"\nbackbone = \"b\"\nmode = \"tallrec\"\nlr = 1.0\nmin_lr = 0.0\nwarmup_steps = 4\nmax_steps = 14").unwrap();
        assert_eq!(c.lr_at(0), 0.25);
        assert_eq!(c.lr_at(3), 1.0);
        assert!((c.lr_at(4) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(9) - 0.5).abs() < 1e-12);
        assert!(c.lr_at(14).abs() < 1e-12);
    }
}
