//! Tokenizers: a Hugging Face `tokenizer.json`, or one rebuilt from GGUF metadata (byte-level
//! BPE vocabularies: GPT-2 style, SmolLM, Qwen2, LLaMA-3). The GGUF vocabulary is turned into
//! the `tokenizer.json` format and handed to the `tokenizers` crate, so both paths tokenize
//! with the same, well-tested code.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
}

fn byte_level_pre(pre: &str) -> Result<serde_json::Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // llama.cpp: "\p{N}" then the GPT-2 expression.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "llama3" | "llama-bpe" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        other => bail!("unsupported GGUF pre-tokenizer '{other}' (supported: gpt2, smollm, qwen2, llama-bpe); use a Hugging Face model directory with tokenizer.json instead"),
    })
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: invalid tokenizer: {e}", path.display()))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        Ok(Self {
            bos_id: find(&["<s>", "<|begin_of_text|>", "<|im_start|>"]),
            eos_id: find(&["</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"]),
            unk_id: find(&["<unk>"]),
            pad_id: find(&["<pad>", "<|endoftext|>", "</s>"]),
            inner,
        })
    }

    /// Rebuilds a byte-level BPE tokenizer from GGUF metadata.
    pub fn from_gguf_vocab(
        model: &str,
        pre: &str,
        tokens: &[String],
        token_types: &[i32],
        merges: &[String],
        ids: [Option<u32>; 4],
    ) -> Result<Self> {
        if model != "gpt2" {
            bail!("GGUF tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2'); use a Hugging Face model directory with tokenizer.json instead");
        }
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(id));
            // 3 = control tokens (<|endoftext|>, <|im_start|>, …): matched whole, never split.
            if token_types.get(id) == Some(&3) {
                added.push(
                    json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true}),
                );
            }
        }
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level_pre(pre)?,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges},
        });
        let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&spec)?)
            .map_err(|e| anyhow!("cannot build the tokenizer from GGUF metadata: {e}"))?;
        let [bos_id, eos_id, unk_id, pad_id] = ids;
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            unk_id,
            pad_id,
        })
    }

    /// Token ids of `text`, without special tokens added around it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer: {e}"))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("tokenizer: {e}"))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a word that must encode to exactly one token.
    pub fn single_token(&self, word: &str) -> Result<u32> {
        let ids = self
            .encode(word)
            .with_context(|| format!("encoding {word:?}"))?;
        match ids.as_slice() {
            [id] => Ok(*id),
            _ => {
                let parts: Vec<String> = ids
                    .iter()
                    .map(|&i| format!("{:?}", self.decode(&[i]).unwrap_or_default()))
                    .collect();
                bail!(
                    "{word:?} encodes to {} tokens ({}), expected exactly one",
                    ids.len(),
                    parts.join(" + ")
                )
            }
        }
    }
}
