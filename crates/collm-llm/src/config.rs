//! One configuration for the LLaMA family, read from a Hugging Face `config.json` or from GGUF
//! metadata. Supported: LLaMA / Vicuna / LLaMA-2/3, SmolLM2 (tied embeddings), Mistral-style
//! checkpoints without sliding windows, Qwen2/2.5 (q/k/v biases).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// `rope_scaling` from config.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    /// `llama` or `qwen2` (decides biases and GGUF tensor layout).
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    pub head_dim: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

impl LlamaConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str, origin: &str) -> Result<Self> {
        let c: HfConfig = serde_json::from_str(text)
            .with_context(|| format!("{origin}: not a valid model config.json"))?;
        let arch = c
            .architectures
            .first()
            .cloned()
            .or(c.model_type.clone())
            .unwrap_or_default();
        let architecture = match arch.as_str() {
            "LlamaForCausalLM" | "llama" | "MistralForCausalLM" | "mistral" => "llama",
            "Qwen2ForCausalLM" | "qwen2" => "qwen2",
            other => bail!(
                "{origin}: unsupported architecture '{other}' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
            ),
        };
        // transformers 5 moved rope_theta/rope_scaling into rope_parameters.
        let mut rope_theta = c.rope_theta;
        let mut rope_scaling = c.rope_scaling;
        if let Some(rp) = &c.rope_parameters {
            if let Some(t) = rp.get("rope_theta").and_then(|v| v.as_f64()) {
                rope_theta = t;
            }
            if let Some(t) = rp.get("rope_type").and_then(|v| v.as_str()) {
                if t != "default" {
                    rope_scaling = Some(
                        serde_json::from_value(rp.clone())
                            .with_context(|| format!("{origin}: rope_parameters"))?,
                    );
                }
            }
        }
        let cfg = Self {
            architecture: architecture.into(),
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            attention_bias: c.attention_bias.unwrap_or(architecture == "qwen2"),
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            bos_token_id: first_id(&c.bos_token_id),
            eos_token_id: first_id(&c.eos_token_id),
        };
        cfg.validate().with_context(|| origin.to_string())?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
            ("head_dim", self.head_dim),
        ] {
            // The upper bound only refuses corrupt values (the largest real models are far below).
            if v == 0 || v > 1 << 24 {
                bail!("{name} is {v}: expected 1..=16777216");
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            bail!(
                "rms_norm_eps is {}: expected a positive number",
                self.rms_norm_eps
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!(
                "rope_theta is {}: expected a positive number",
                self.rope_theta
            );
        }
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim ({}) must be even for RoPE", self.head_dim);
        }
        if let Some(s) = &self.rope_scaling {
            match s.rope_type.as_str() {
                "llama3" | "linear" | "default" => {}
                other => {
                    bail!("unsupported rope_scaling type '{other}' (supported: llama3, linear)")
                }
            }
        }
        Ok(())
    }

    /// Inverse RoPE frequencies, with LLaMA-3 or linear scaling applied.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        if let Some(s) = &self.rope_scaling {
            let factor = s.factor.unwrap_or(1.0);
            match s.rope_type.as_str() {
                "linear" => inv.iter_mut().for_each(|f| *f /= factor),
                "llama3" => {
                    let low = s.low_freq_factor.unwrap_or(1.0);
                    let high = s.high_freq_factor.unwrap_or(4.0);
                    let old = s.original_max_position_embeddings.unwrap_or(8192) as f64;
                    let low_wavelen = old / low;
                    let high_wavelen = old / high;
                    for f in inv.iter_mut() {
                        let wavelen = 2.0 * std::f64::consts::PI / *f;
                        if wavelen > low_wavelen {
                            *f /= factor;
                        } else if wavelen >= high_wavelen {
                            let smooth = (old / wavelen - low) / (high - low);
                            *f = (1.0 - smooth) * *f / factor + smooth * *f;
                        }
                    }
                }
                _ => {}
            }
        }
        inv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llama_qwen_and_rejects_others() {
        let llama = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
            "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":[2,3]}"#;
        let c = LlamaConfig::from_hf_json(llama, "c").unwrap();
        assert_eq!(c.architecture, "llama");
        assert_eq!(c.head_dim, 16);
        assert!(!c.attention_bias);
        assert_eq!(c.eos_token_id, Some(2));
        let qwen = llama.replace("LlamaForCausalLM", "Qwen2ForCausalLM");
        assert!(
            LlamaConfig::from_hf_json(&qwen, "c")
                .unwrap()
                .attention_bias
        );
        let bad = llama.replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
        let e = LlamaConfig::from_hf_json(&bad, "c").unwrap_err();
        assert!(format!("{e:#}").contains("unsupported architecture 'GPTNeoXForCausalLM'"));
        let gqa = llama.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(LlamaConfig::from_hf_json(&gqa, "c").is_err());
    }
}
