//! Tiny backbones for tests and demos: a random LLaMA-shaped model (2 layers, hidden 32) with a
//! real byte-level BPE tokenizer in which " Yes" and " No" are single tokens, written as a
//! Hugging Face model directory. Behind the `testing` feature: the tests of the crates above
//! enable it as a dev-dependency; it is not part of the library's API.

use crate::config::LlamaConfig;
use crate::load::random_weights;
use anyhow::Result;
use candle_core::{DType, Device};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// GPT-2's byte → printable-character table used by byte-level BPE vocabularies.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).expect("valid char");
    }
    table
}

/// Writes config.json, model.safetensors and tokenizer.json of a tiny random model to `dir`.
pub fn write_tiny_backbone(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let table = bytes_to_unicode();
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (b, c) in table.iter().enumerate() {
        vocab.insert(c.to_string(), b as u32);
    }
    let sp = table[b' ' as usize];
    let merges_src = [
        (format!("{sp}"), "Y".to_string()),
        (format!("{sp}Y"), "e".to_string()),
        (format!("{sp}Ye"), "s".to_string()),
        (format!("{sp}"), "N".to_string()),
        (format!("{sp}N"), "o".to_string()),
        (format!("{sp}"), "t".to_string()),
        ("t".to_string(), "h".to_string()),
        ("th".to_string(), "e".to_string()),
    ];
    let mut merges = Vec::new();
    for (a, b) in &merges_src {
        let id = vocab.len() as u32;
        vocab.entry(format!("{a}{b}")).or_insert(id);
        merges.push(format!("{a} {b}"));
    }
    let specials = ["<unk>", "<s>", "</s>"];
    let mut added = Vec::new();
    for s in specials {
        let id = vocab.len() as u32;
        vocab.insert(s.into(), id);
        added.push(
            json!({"id": id, "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}),
        );
    }
    let vocab_size = vocab.len();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok)?)?;
    let cfg = LlamaConfig {
        architecture: "llama".into(),
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
        attention_bias: false,
        head_dim: 8,
        bos_token_id: None,
        eos_token_id: None,
    };
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": vocab_size, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "max_position_embeddings": 2048
        }))?,
    )?;
    let _ = seed;
    let w = random_weights(&cfg, DType::F32, &Device::Cpu)?;
    candle_core::safetensors::save(&w.tensors, dir.join("model.safetensors"))?;
    Ok(())
}
