//! LoRA adapters (Hu et al.) on any of the decoder's linear layers, saved and loaded in PEFT's
//! format: `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names
//! (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, shape (r, in);
//! `…lora_B.weight`, shape (out, r)). Initialisation as PEFT: A Kaiming-uniform, B zero.

use crate::config::LlamaConfig;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use collm_nn::{Init, ParamStore};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A projection of a decoder layer: what a LoRA pair adapts, found by index (no string keys
/// on the hot path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// PEFT's name of the module (`q_proj`, …).
    pub fn name(self) -> &'static str {
        MODULES[self as usize]
    }

    pub fn from_name(name: &str) -> Option<Self> {
        MODULES
            .iter()
            .position(|m| *m == name)
            .map(|i| Self::ALL[i])
    }
}

/// The submodule a projection lives in.
pub fn module_path(module: &str) -> &'static str {
    match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
        _ => "mlp",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    /// The CoLLM reference's settings: r 8, alpha 16, dropout 0.05 on q and v.
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("LoRA rank r must be at least 1");
        }
        use collm_core::fields::{check, End};
        check("lora.alpha", self.alpha, End::Open(0.0), End::Closed(1e4))?;
        check(
            "lora.dropout",
            self.dropout,
            End::Closed(0.0),
            End::Open(1.0),
        )?;
        if self.target_modules.is_empty() {
            bail!("LoRA needs at least one target module");
        }
        for m in &self.target_modules {
            if !MODULES.contains(&m.as_str()) {
                bail!(
                    "unknown LoRA target module '{m}' (known: {})",
                    MODULES.join(", ")
                );
            }
        }
        Ok(())
    }
}

/// The (in, out) sizes of a projection.
pub fn module_shape(cfg: &LlamaConfig, module: &str) -> (usize, usize) {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    match module {
        "q_proj" => (h, q),
        "k_proj" | "v_proj" => (h, kv),
        "o_proj" => (q, h),
        "gate_proj" | "up_proj" => (h, cfg.intermediate_size),
        _ => (cfg.intermediate_size, h),
    }
}

fn peft_key(layer: usize, module: &str, ab: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{module}.lora_{ab}.weight",
        module_path(module)
    )
}

pub struct Lora {
    pub config: LoraConfig,
    pub params: ParamStore,
    /// `pairs[layer][module as usize]` = (A (r, in), B (out, r)).
    pairs: Vec<[Option<(Tensor, Tensor)>; 7]>,
}

impl Lora {
    pub fn new(cfg: &LoraConfig, model: &LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let mut params = ParamStore::new(device, seed);
        let mut pairs = vec![[const { None }; 7]; model.num_hidden_layers];
        for (layer, slots) in pairs.iter_mut().enumerate() {
            for m in &cfg.target_modules {
                let (fan_in, fan_out) = module_shape(model, m);
                // PEFT: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)).
                let a = params.param(
                    &peft_key(layer, m, "A"),
                    &[cfg.r, fan_in],
                    Init::Uniform {
                        bound: 1.0 / (fan_in as f64).sqrt(),
                    },
                )?;
                let b = params.param(&peft_key(layer, m, "B"), &[fan_out, cfg.r], Init::Zeros)?;
                let module = Module::from_name(m).expect("validated module name");
                slots[module as usize] = Some((a, b));
            }
        }
        Ok(Self {
            config: cfg.clone(),
            params,
            pairs,
        })
    }

    /// Stops gradients at this adapter (a frozen step-1 LoRA): its tensors are used detached,
    /// so backpropagation neither reaches nor computes anything for them.
    pub fn freeze(&mut self) {
        for (a, b) in self.pairs.iter_mut().flatten().flatten() {
            *a = a.detach();
            *b = b.detach();
        }
    }

    /// The (A, B) pair adapting `module` of `layer`, if any.
    pub fn pair(&self, layer: usize, module: Module) -> Option<&(Tensor, Tensor)> {
        self.pairs.get(layer)?[module as usize].as_ref()
    }

    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.params.trainable()
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`: PEFT's layout
    /// and key names (`PeftModel.from_pretrained` opens it). `base_model` goes into
    /// `base_model_name_or_path`, so it must be a name PEFT can resolve ([`peft_base_name`]).
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let cfg = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": self.config.target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "use_rslora": false,
            "use_dora": false,
            "revision": null,
        });
        write_atomic(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&cfg)?.as_bytes(),
        )?;
        self.params.save(&dir.join("adapter_model.safetensors"))
    }

    /// Loads a PEFT adapter directory for `model`.
    pub fn load_peft(dir: &Path, model: &LlamaConfig, device: &Device) -> Result<Self> {
        let cpath = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cpath)
            .with_context(|| format!("{}: cannot read", cpath.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", cpath.display()))?;
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| anyhow!("{}: field '{k}' is missing", cpath.display()))
        };
        if field("peft_type")?.as_str() != Some("LORA") {
            bail!("{}: peft_type is not LORA", cpath.display());
        }
        let targets = match field("target_modules")? {
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            serde_json::Value::String(s) => vec![s.clone()],
            _ => bail!("{}: target_modules must be a list", cpath.display()),
        };
        // Every adapter feature collm does not implement is refused: scoring with it ignored
        // would be silently wrong.
        let is_true = |k: &str| v.get(k).and_then(|x| x.as_bool()) == Some(true);
        let is_set = |k: &str| match v.get(k) {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Object(m)) => !m.is_empty(),
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        for (key, what) in [
            ("use_rslora", "rsLoRA"),
            ("use_dora", "DoRA"),
            ("fan_in_fan_out", "fan_in_fan_out (Conv1D-style) weights"),
        ] {
            if is_true(key) {
                bail!(
                    "{}: {what} adapters are not supported ('{key}' is true)",
                    cpath.display()
                );
            }
        }
        for (key, what) in [
            ("alpha_pattern", "per-module alphas"),
            ("rank_pattern", "per-module ranks"),
            ("modules_to_save", "extra trained modules"),
            ("layers_to_transform", "LoRA on a subset of layers"),
            ("layer_replication", "layer replication"),
        ] {
            if is_set(key) {
                bail!(
                    "{}: adapters with {what} ('{key}') are not supported",
                    cpath.display()
                );
            }
        }
        match v.get("bias").and_then(|x| x.as_str()) {
            None | Some("none") => {}
            Some(b) => bail!(
                "{}: adapters with trained biases (bias = \"{b}\") are not supported; expected \"none\"",
                cpath.display()
            ),
        }
        let cfg = LoraConfig {
            r: field("r")?.as_u64().unwrap_or(0) as usize,
            alpha: field("lora_alpha")?.as_f64().unwrap_or(0.0),
            dropout: v
                .get("lora_dropout")
                .and_then(|x| x.as_f64())
                .unwrap_or(0.0),
            target_modules: targets,
        };
        cfg.validate()
            .with_context(|| cpath.display().to_string())?;
        let lora = Self::new(&cfg, model, 0, device)?;
        let wpath = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&wpath, device)
            .with_context(|| format!("{}: cannot read", wpath.display()))?;
        // PEFT sometimes writes keys with the adapter name (".default") inside: accept both.
        let mut normalized: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in tensors {
            collm_nn::ensure_finite(&t, &wpath, &k)?;
            normalized.insert(k.replace(".default.weight", ".weight"), t);
        }
        for name in lora.params.names() {
            let t = normalized
                .get(&name)
                .ok_or_else(|| anyhow!("{}: tensor '{name}' is missing", wpath.display()))?;
            let var = lora.params.get(&name).expect("known name");
            if t.dims() != var.dims() {
                bail!(
                    "{}: tensor '{name}' has shape {:?}, expected {:?}",
                    wpath.display(),
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(DType::F32)?.to_dtype(var.dtype())?)?;
        }
        Ok(lora)
    }
}

/// The `base_model_name_or_path` PEFT can resolve for a backbone: a Hugging Face model
/// directory is its own path; a GGUF file is named by the Hub repository it was converted from
/// when the file name says which (`SmolLM2-135M-Instruct.Q4_1.gguf` →
/// `HuggingFaceTB/SmolLM2-135M-Instruct`), else by its file stem.
pub fn peft_base_name(backbone: &Path) -> String {
    if backbone.is_dir() {
        return backbone
            .canonicalize()
            .unwrap_or_else(|_| backbone.to_path_buf())
            .display()
            .to_string();
    }
    let stem = backbone
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    const KNOWN: [(&str, &str); 6] = [
        (
            "SmolLM2-135M-Instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        (
            "SmolLM2-360M-Instruct",
            "HuggingFaceTB/SmolLM2-360M-Instruct",
        ),
        (
            "SmolLM2-1.7B-Instruct",
            "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        ),
        ("Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
        (
            "TinyLlama-1.1B-Chat-v1.0",
            "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        ),
        ("vicuna-7b-v1.5", "lmsys/vicuna-7b-v1.5"),
    ];
    let lower = stem.to_lowercase();
    KNOWN
        .iter()
        .find(|(k, _)| lower.starts_with(&k.to_lowercase()))
        .map(|(_, hub)| hub.to_string())
        .unwrap_or(stem)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename", path.display()))?;
    Ok(())
}
