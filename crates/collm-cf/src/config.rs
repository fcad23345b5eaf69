//! Training configuration of a collaborative model: one TOML file, every field optional except
//! `model`; what is missing takes the model's default (the reference's ML-1M settings,
//! reference-spec §4).

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Mf,
    #[serde(rename = "lightgcn")]
    LightGcn,
    #[serde(rename = "sasrec")]
    SasRec,
    Din,
}

impl ModelKind {
    pub const ALL: [ModelKind; 4] = [
        ModelKind::Mf,
        ModelKind::LightGcn,
        ModelKind::SasRec,
        ModelKind::Din,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Mf => "mf",
            ModelKind::LightGcn => "lightgcn",
            ModelKind::SasRec => "sasrec",
            ModelKind::Din => "din",
        }
    }
}

impl std::str::FromStr for ModelKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        ModelKind::ALL
            .into_iter()
            .find(|k| k.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                anyhow!("unknown model '{s}': expected one of mf, lightgcn, sasrec, din")
            })
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CfConfig {
    pub model: ModelKind,
    /// Embedding size. For DIN: the size of each of its three fields (d1 = 3·dim).
    pub dim: usize,
    pub lr: f64,
    /// Adam's L2 weight decay (torch.optim.Adam's `weight_decay`).
    pub weight_decay: f64,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub max_epochs: usize,
    /// Stop after this many epochs without a better valid AUC.
    pub patience: usize,
    pub seed: u64,
    /// Std of the normal initialisation of MF/LightGCN tables.
    pub init_std: f64,
    /// LightGCN propagation layers.
    pub layers: usize,
    /// SASRec: history items read; DIN: history items attended to.
    pub max_len: usize,
    /// SASRec blocks.
    pub blocks: usize,
    /// SASRec attention heads.
    pub heads: usize,
    /// SASRec / DIN dropout.
    pub dropout: f64,
    /// DIN head MLP hidden sizes.
    pub hidden: Vec<usize>,
}

impl CfConfig {
    /// The defaults of a model (the reference's ML-1M baselines).
    pub fn defaults(model: ModelKind) -> Self {
        let base = Self {
            model,
            dim: 64,
            lr: 1e-3,
            weight_decay: 1e-4,
            batch_size: 1024,
            eval_batch_size: 4096,
            max_epochs: 1000,
            patience: 50,
            seed: 2023,
            init_std: 0.1,
            layers: 2,
            max_len: 25,
            blocks: 2,
            heads: 1,
            dropout: 0.2,
            hidden: vec![200, 80],
        };
        match model {
            ModelKind::Mf => Self {
                dim: 256,
                init_std: 1.0,
                ..base
            },
            ModelKind::LightGcn => Self { lr: 1e-2, ..base },
            ModelKind::SasRec => Self {
                lr: 1e-2,
                weight_decay: 1e-2,
                batch_size: 2048,
                patience: 30,
                ..base
            },
            ModelKind::Din => Self {
                lr: 1e-4,
                max_len: 10,
                ..base
            },
        }
    }

    /// Parses a TOML config: `model` is required, everything else defaults per model.
    /// A run's own `config.toml` (`[cf]` and `[data]`) is accepted too: its `[cf]` table is the
    /// config, so "train this again" is `--config RUN/config.toml`.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let mut table: toml::Table =
            toml::from_str(text).with_context(|| format!("{origin}: not valid TOML"))?;
        if !table.contains_key("model") && table.contains_key("data") {
            if let Some(toml::Value::Table(cf)) = table.remove("cf") {
                table = cf;
            }
        }
        let model = table
            .get("model")
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow!("{origin}: missing field 'model' (mf, lightgcn, sasrec, din)"))?
            .parse::<ModelKind>()
            .with_context(|| format!("{origin}: field 'model'"))?;
        Self::defaults(model).with_overrides(table, origin)
    }

    /// Applies the fields of a TOML table over this config; unknown fields are errors.
    pub fn with_overrides(&self, overrides: toml::Table, origin: &str) -> Result<Self> {
        let mut merged = toml::Table::try_from(self)?;
        for (k, v) in overrides {
            if !merged.contains_key(&k) {
                bail!(
                    "{origin}: unknown field '{k}' (known: {})",
                    merged.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            merged.insert(k, v);
        }
        let cfg: Self = merged
            .try_into()
            .with_context(|| format!("{origin}: invalid value"))?;
        cfg.validate().with_context(|| origin.to_string())?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("dim", self.dim),
            ("batch_size", self.batch_size),
            ("eval_batch_size", self.eval_batch_size),
            ("max_epochs", self.max_epochs),
            ("patience", self.patience),
            ("heads", self.heads),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("field '{name}' must be at least 1");
            }
        }
        use collm_core::fields::{check, End};
        let field = |r: Result<()>| r.map_err(|e| anyhow::anyhow!("field {e}"));
        field(check("lr", self.lr, End::Open(0.0), End::Closed(10.0)))?;
        field(check(
            "weight_decay",
            self.weight_decay,
            End::Closed(0.0),
            End::Closed(100.0),
        ))?;
        field(check(
            "init_std",
            self.init_std,
            End::Open(0.0),
            End::Closed(100.0),
        ))?;
        field(check(
            "dropout",
            self.dropout,
            End::Closed(0.0),
            End::Open(1.0),
        ))?;
        if self.model == ModelKind::SasRec && !self.dim.is_multiple_of(self.heads) {
            bail!(
                "field 'heads' ({}) must divide 'dim' ({})",
                self.heads,
                self.dim
            );
        }
        if matches!(self.model, ModelKind::SasRec | ModelKind::Din) && self.max_len == 0 {
            bail!("field 'max_len' must be at least 1 for {}", self.model);
        }
        Ok(())
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_fields() {
        let c = CfConfig::from_toml("model = \"mf\"\nlr = 0.01\ndim = 64\n", "t").unwrap();
        assert_eq!(c.model, ModelKind::Mf);
        assert_eq!(c.lr, 0.01);
        assert_eq!(c.dim, 64);
        assert_eq!(c.batch_size, 1024);
        let e = CfConfig::from_toml("model = \"mf\"\nlearning_rate = 1\n", "t").unwrap_err();
        assert!(format!("{e:#}").contains("unknown field 'learning_rate'"));
        let e = CfConfig::from_toml("model = \"bpr\"\n", "t").unwrap_err();
        assert!(format!("{e:#}").contains("unknown model 'bpr'"));
        let e = CfConfig::from_toml("lr = 1\n", "t").unwrap_err();
        assert!(format!("{e:#}").contains("missing field 'model'"));
        let e = CfConfig::from_toml("model = \"sasrec\"\ndim = 10\nheads = 3\n", "t").unwrap_err();
        assert!(format!("{e:#}").contains("must divide"));
        let round = CfConfig::from_toml(&c.to_toml().unwrap(), "t").unwrap();
        assert_eq!(round, c);
    }
}
