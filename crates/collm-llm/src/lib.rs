//! The LLM-prediction box of CoLLM's pipeline: a LLaMA-family decoder with LoRA that reads a
//! sequence of *embeddings* (token embeddings with collaborative vectors injected at the ID
//! slots) and returns the logits of chosen tokens (" Yes") at each row's last real position.
//!
//! - [`config`]: one config for LLaMA/Vicuna, LLaMA-2/3, SmolLM2, Qwen2 (HF or GGUF).
//! - [`load`]: Hugging Face directories (safetensors, sharded) and GGUF files.
//! - [`tokenizer`]: tokenizer.json, or a byte-level BPE rebuilt from GGUF metadata.
//! - [`decoder`]: the model; [`lora`]: adapters in PEFT's format; [`ops`]: the operations the
//!   decoder calls, each choosing its implementation (the CPU kernels with their backward
//!   passes, or the composed reference ops on other devices).

#[cfg(feature = "bench")]
pub mod bench;
pub mod config;
pub mod decoder;
pub mod load;
pub mod lora;
pub mod ops;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tokenizer;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
pub use config::LlamaConfig;
pub use decoder::{Decoder, Mask, Pass, PrefixCache};
pub use lora::{Lora, LoraConfig};
use std::path::Path;
pub use tokenizer::Tokenizer;

/// A decoder with its tokenizer.
pub struct Backbone {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    /// Where it was loaded from.
    pub source: String,
}

impl Backbone {
    /// Loads a Hugging Face model directory or a GGUF file; the tokenizer is required.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let ck = load::load(path, dtype, device)?;
        let Some(tokenizer) = ck.tokenizer else {
            bail!(
                "{}: no tokenizer.json next to the weights (a tokenizer is needed for prompts)",
                path.display()
            );
        };
        let decoder = Decoder::new(&ck.config, &ck.weights, dtype, device)?;
        Ok(Self {
            decoder,
            tokenizer,
            source: path.display().to_string(),
        })
    }

    /// The next-token logits after `prompt` (encoded without special tokens): those of `words`
    /// (each must be one token), and the `top` highest, best first. `collm llm score`.
    pub fn next_token_logits(
        &self,
        prompt: &str,
        words: &[String],
        top: usize,
    ) -> Result<NextToken> {
        let ids = self.tokenizer.encode(prompt)?;
        if ids.is_empty() {
            bail!("the prompt encodes to no tokens");
        }
        let word_ids = words
            .iter()
            .map(|w| self.tokenizer.single_token(w))
            .collect::<Result<Vec<_>>>()?;
        let dec = &self.decoder;
        let emb = dec.embed(&ids)?.unsqueeze(0)?;
        let mask = Mask::left_padded(&[ids.len()], ids.len());
        let h = dec.forward_at(&emb, &mask, &Pass::inference(), &[ids.len() - 1])?;
        let logits = dec.vocab_logits(&h, &[0])?.to_vec2::<f32>()?;
        let row = &logits[0];
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
        Ok(NextToken {
            prompt_tokens: ids.len(),
            words: words
                .iter()
                .zip(&word_ids)
                .map(|(w, &id)| (w.clone(), row[id as usize]))
                .collect(),
            top: order
                .iter()
                .take(top)
                .map(|&i| {
                    let text = self.tokenizer.decode(&[i as u32]).unwrap_or_default();
                    (text, i as u32, row[i])
                })
                .collect(),
        })
    }
}

/// What [`Backbone::next_token_logits`] returns.
#[derive(Debug, Clone)]
pub struct NextToken {
    pub prompt_tokens: usize,
    /// (word, logit) for each word asked for, in order.
    pub words: Vec<(String, f32)>,
    /// (token text, id, logit), best first.
    pub top: Vec<(String, u32, f32)>,
}

/// Parses a dtype name: `f32` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => bail!("unknown dtype '{other}' (f32, bf16, f16)"),
    }
}

/// The name [`parse_dtype`] reads.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// The compute device, as `COLLM_DEVICE` says: `cpu`; `cuda` or `cuda:N` (GPU N); unset or
/// `auto`, the first CUDA GPU in a `cuda` build when one is present, else the CPU. A value it
/// cannot honour (no GPU, a build without CUDA, an unknown name) is said once on stderr, and
/// the CPU is used.
pub fn device() -> candle_core::Device {
    let want = std::env::var("COLLM_DEVICE").unwrap_or_default();
    let warn = |msg: String| {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| tracing::warn!("{msg}"));
    };
    let gpu = match want.trim() {
        "cpu" => return candle_core::Device::Cpu,
        "" | "auto" => {
            if !candle_core::utils::cuda_is_available() {
                return candle_core::Device::Cpu;
            }
            0
        }
        "cuda" => 0,
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => n,
            None => {
                warn(format!(
                    "COLLM_DEVICE={other}: expected cpu, cuda, cuda:N or auto; running on the CPU"
                ));
                return candle_core::Device::Cpu;
            }
        },
    };
    if !candle_core::utils::cuda_is_available() {
        warn(format!(
            "COLLM_DEVICE={want}: this build has no CUDA (build with --features collm-cli/cuda); running on the CPU"
        ));
        return candle_core::Device::Cpu;
    }
    match candle_core::Device::new_cuda(gpu) {
        Ok(g) => g,
        Err(e) => {
            warn(format!(
                "COLLM_DEVICE={want}: no usable GPU {gpu} ({e}); running on the CPU"
            ));
            candle_core::Device::Cpu
        }
    }
}
