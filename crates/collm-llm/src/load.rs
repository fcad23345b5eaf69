//! Loading weights: a Hugging Face model directory (config.json, tokenizer.json, one
//! model.safetensors or shards with model.safetensors.index.json) or a GGUF file (config and
//! tokenizer from its metadata; quantized tensors dequantized to the compute dtype). Tensors
//! are kept under their Hugging Face names either way.

use crate::config::LlamaConfig;
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Named weights in the compute dtype, with where they came from (for error messages).
pub struct Weights {
    pub source: String,
    pub tensors: HashMap<String, Tensor>,
}

impl Weights {
    /// The tensor `name`, checked against the expected shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("{}: tensor '{name}' is missing", self.source))?;
        if t.dims() != shape {
            bail!(
                "{}: tensor '{name}' has shape {:?}, the config implies {shape:?}",
                self.source,
                t.dims()
            );
        }
        Ok(t.clone())
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A loaded checkpoint: config, weights and (when one ships) tokenizer.
pub struct Checkpoint {
    pub config: LlamaConfig,
    pub weights: Weights,
    pub tokenizer: Option<Tokenizer>,
}

/// Loads a model directory or a `.gguf` file.
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
    if path.is_dir() {
        load_hf_dir(path, dtype, device)
    } else if path.is_file() {
        load_gguf(path, dtype, device)
    } else {
        bail!(
            "{}: not found (expected a Hugging Face model directory or a .gguf file)",
            path.display()
        )
    }
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )
}

pub fn load_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
    let cpath = dir.join("config.json");
    let text = std::fs::read_to_string(&cpath)
        .with_context(|| format!("{}: cannot read", cpath.display()))?;
    let config = LlamaConfig::from_hf_json(&text, &cpath.display().to_string())?;
    let mut tensors = HashMap::new();
    for file in shard_files(dir)? {
        let loaded = candle_core::safetensors::load(&file, device).with_context(|| {
            format!(
                "{}: cannot read (corrupt or truncated safetensors?)",
                file.display()
            )
        })?;
        for (k, t) in loaded {
            collm_nn::ensure_finite(&t, &file, &k)?;
            tensors.insert(k, t.to_dtype(dtype)?);
        }
    }
    let tpath = dir.join("tokenizer.json");
    let tokenizer = if tpath.is_file() {
        Some(Tokenizer::from_file(&tpath)?)
    } else {
        None
    };
    Ok(Checkpoint {
        config,
        weights: Weights {
            source: dir.display().to_string(),
            tensors,
        },
        tokenizer,
    })
}

fn meta<'a>(c: &'a gguf_file::Content, key: &str, path: &Path) -> Result<&'a gguf_file::Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| anyhow!("{}: GGUF metadata '{key}' is missing", path.display()))
}

fn meta_u(c: &gguf_file::Content, key: &str, path: &Path) -> Result<usize> {
    let v = meta(c, key, path)?;
    Ok(v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .map_err(|e| anyhow!("{}: GGUF metadata '{key}': {e}", path.display()))? as usize)
}

fn meta_f(c: &gguf_file::Content, key: &str) -> Option<f64> {
    c.metadata
        .get(key)
        .and_then(|v| v.to_f32().map(f64::from).ok().or_else(|| v.to_f64().ok()))
}

fn meta_id(c: &gguf_file::Content, key: &str) -> Option<u32> {
    c.metadata.get(key).and_then(|v| v.to_u32().ok())
}

fn meta_strings(c: &gguf_file::Content, key: &str, path: &Path) -> Result<Vec<String>> {
    let arr = meta(c, key, path)?
        .to_vec()
        .map_err(|e| anyhow!("{}: GGUF metadata '{key}': {e}", path.display()))?;
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| anyhow!("{}: GGUF metadata '{key}': {e}", path.display()))
        })
        .collect()
}

/// GGUF tensor names → Hugging Face names.
fn hf_name(gguf: &str) -> Option<String> {
    let map = |s: &str| -> Option<&'static str> {
        Some(match s {
            "attn_norm" => "input_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            _ => return None,
        })
    };
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    Some(format!("model.layers.{layer}.{}.{kind}", map(module)?))
}

/// llama.cpp stores LLaMA q/k rows interleaved for its RoPE; undo it so that the
/// Hugging Face rotate-half RoPE applies, as for safetensors.
fn unpermute(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let hd = rows / heads;
    Ok(t.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

/// Checks a GGUF tensor's declared shape and place with checked arithmetic before anything is
/// allocated for it: the element count must not overflow, the bytes must lie inside the file,
/// and the dequantized size is then bounded by the file's size.
fn check_gguf_tensor(c: &gguf_file::Content, name: &str, file_len: u64, path: &Path) -> Result<()> {
    let info = &c.tensor_infos[name];
    let dims = info.shape.dims();
    let elems = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n > 0 && n <= isize::MAX as usize / 4)
        .ok_or_else(|| {
            anyhow!(
                "{}: tensor '{name}': shape {dims:?} is empty or too large (corrupt file?)",
                path.display()
            )
        })?;
    let (block, type_size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
    if block == 0 || elems % block != 0 {
        bail!(
            "{}: tensor '{name}': {elems} elements are not a whole number of {block}-element blocks",
            path.display()
        );
    }
    let bytes = ((elems / block) as u64).checked_mul(type_size as u64);
    let end = c
        .tensor_data_offset
        .checked_add(info.offset)
        .zip(bytes)
        .and_then(|(start, b)| start.checked_add(b));
    match end {
        Some(end) if end <= file_len => Ok(()),
        _ => bail!(
            "{}: tensor '{name}' (shape {dims:?}, offset {}) reaches past the end of the file ({file_len} bytes): truncated or corrupt",
            path.display(),
            info.offset
        ),
    }
}

pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    read_gguf(&mut file, path, dtype, device)
}

/// Reads a GGUF model from any seekable reader (`path` names it in messages): what
/// [`load_gguf`] does with a file, and what the fuzz target feeds bytes to.
pub fn read_gguf<R: std::io::Read + std::io::Seek>(
    file: &mut R,
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Checkpoint> {
    let file_len = file
        .seek(std::io::SeekFrom::End(0))
        .and_then(|n| file.seek(std::io::SeekFrom::Start(0)).map(|_| n))
        .with_context(|| format!("{}: cannot read", path.display()))?;
    // candle's reader bounds its allocations by the file size but can still panic on some
    // hostile headers (an alignment of 0 divides by zero): a panic there is a refused file.
    let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gguf_file::Content::read(file)
    }))
    .map_err(|_| {
        anyhow!(
            "{}: not a valid GGUF file (malformed header)",
            path.display()
        )
    })?
    .map_err(|e| anyhow!("{}: not a valid GGUF file: {e}", path.display()))?;
    let arch = meta(&content, "general.architecture", path)?
        .to_string()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?
        .clone();
    if arch != "llama" && arch != "qwen2" {
        bail!(
            "{}: unsupported GGUF architecture '{arch}' (supported: llama, qwen2)",
            path.display()
        );
    }
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = meta_u(&content, &k("embedding_length"), path)?;
    let heads = meta_u(&content, &k("attention.head_count"), path)?;
    let kv_heads = meta_u(&content, &k("attention.head_count_kv"), path).unwrap_or(heads);
    let tokens = meta_strings(&content, "tokenizer.ggml.tokens", path)?;
    let vocab = meta_u(&content, &k("vocab_size"), path).unwrap_or(tokens.len());
    let has_output = content.tensor_infos.contains_key("output.weight");
    let config = LlamaConfig {
        architecture: arch.clone(),
        hidden_size: hidden,
        intermediate_size: meta_u(&content, &k("feed_forward_length"), path)?,
        num_hidden_layers: meta_u(&content, &k("block_count"), path)?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        vocab_size: vocab,
        rms_norm_eps: meta_f(&content, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        rope_theta: meta_f(&content, &k("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: meta_u(&content, &k("context_length"), path).unwrap_or(4096),
        tie_word_embeddings: !has_output,
        attention_bias: arch == "qwen2",
        head_dim: meta_u(&content, &k("attention.key_length"), path)
            .unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
        bos_token_id: meta_id(&content, "tokenizer.ggml.bos_token_id"),
        eos_token_id: meta_id(&content, "tokenizer.ggml.eos_token_id"),
    };
    config
        .validate()
        .with_context(|| path.display().to_string())?;
    let mut tensors = HashMap::new();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let Some(hf) = hf_name(&name) else {
            tracing::debug!("{}: ignoring tensor {name}", path.display());
            continue;
        };
        check_gguf_tensor(&content, &name, file_len, path)?;
        let q = content
            .tensor(file, &name, device)
            .map_err(|e| anyhow!("{}: tensor '{name}': {e}", path.display()))?;
        let mut t = q
            .dequantize(device)
            .map_err(|e| anyhow!("{}: tensor '{name}': {e}", path.display()))?;
        collm_nn::ensure_finite(&t, path, &name)?;
        if arch == "llama" {
            if name.ends_with("attn_q.weight") {
                t = unpermute(&t, heads)?;
            } else if name.ends_with("attn_k.weight") {
                t = unpermute(&t, kv_heads)?;
            }
        }
        tensors.insert(hf, t.to_dtype(dtype)?);
    }
    let model = meta(&content, "tokenizer.ggml.model", path)?
        .to_string()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?
        .clone();
    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "default".into());
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?
            .iter()
            .map(|x| x.to_i32().unwrap_or(1))
            .collect(),
        None => Vec::new(),
    };
    let merges = meta_strings(&content, "tokenizer.ggml.merges", path).unwrap_or_default();
    let tokenizer = Tokenizer::from_gguf_vocab(
        &model,
        &pre,
        &tokens,
        &types,
        &merges,
        [
            meta_id(&content, "tokenizer.ggml.bos_token_id"),
            meta_id(&content, "tokenizer.ggml.eos_token_id"),
            meta_id(&content, "tokenizer.ggml.unknown_token_id"),
            meta_id(&content, "tokenizer.ggml.padding_token_id"),
        ],
    )
    .with_context(|| path.display().to_string())?;
    Ok(Checkpoint {
        config,
        weights: Weights {
            source: path.display().to_string(),
            tensors,
        },
        tokenizer: Some(tokenizer),
    })
}

/// LLaMA-shaped configs of the reference benchmark (`../shared/bench/ref_lora_throughput.py`).
pub fn bench_shape(name: &str) -> Result<LlamaConfig> {
    let (h, i, l, nh, nkv, v, theta, tie) = match name {
        "tiny" => (64, 128, 2, 4, 2, 1000, 10_000.0, true),
        "smollm2-135m" => (576, 1536, 30, 9, 3, 49152, 100_000.0, true),
        "qwen2.5-0.5b-shape" => (896, 4864, 24, 14, 2, 151_936, 1_000_000.0, true),
        "vicuna-7b" => (4096, 11008, 32, 32, 32, 32000, 10_000.0, false),
        other => {
            bail!("unknown shape '{other}' (tiny, smollm2-135m, qwen2.5-0.5b-shape, vicuna-7b)")
        }
    };
    Ok(LlamaConfig {
        architecture: "llama".into(),
        hidden_size: h,
        intermediate_size: i,
        num_hidden_layers: l,
        num_attention_heads: nh,
        num_key_value_heads: nkv,
        vocab_size: v,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: tie,
        attention_bias: false,
        head_dim: h / nh,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    })
}

/// Random weights (N(0, 0.02), norms 1) for a config: throughput does not depend on values.
pub fn random_weights(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Weights> {
    let mut tensors = HashMap::new();
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let mut add = |name: String, shape: &[usize], norm: bool| -> Result<()> {
        let t = if norm {
            Tensor::ones(shape, dtype, device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?
        };
        tensors.insert(name, t);
        Ok(())
    };
    add("model.embed_tokens.weight".into(), &[v, h], false)?;
    if !cfg.tie_word_embeddings {
        add("lm_head.weight".into(), &[v, h], false)?;
    }
    add("model.norm.weight".into(), &[h], true)?;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), &[h], true)?;
        add(format!("{p}.post_attention_layernorm.weight"), &[h], true)?;
        add(format!("{p}.self_attn.q_proj.weight"), &[q, h], false)?;
        add(format!("{p}.self_attn.k_proj.weight"), &[kv, h], false)?;
        add(format!("{p}.self_attn.v_proj.weight"), &[kv, h], false)?;
        add(format!("{p}.self_attn.o_proj.weight"), &[h, q], false)?;
        add(
            format!("{p}.mlp.gate_proj.weight"),
            &[cfg.intermediate_size, h],
            false,
        )?;
        add(
            format!("{p}.mlp.up_proj.weight"),
            &[cfg.intermediate_size, h],
            false,
        )?;
        add(
            format!("{p}.mlp.down_proj.weight"),
            &[h, cfg.intermediate_size],
            false,
        )?;
    }
    Ok(Weights {
        source: format!("random weights ({} layers)", cfg.num_hidden_layers),
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").as_deref(),
            Some("model.layers.0.self_attn.k_proj.bias")
        );
        assert_eq!(
            hf_name("blk.12.ffn_down.weight").as_deref(),
            Some("model.layers.12.mlp.down_proj.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, hd, cols) = (2, 4, 3);
        let w = Tensor::arange(0f32, (heads * hd * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * hd, cols))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, hd / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((heads * hd, cols))
            .unwrap();
        let back = unpermute(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
