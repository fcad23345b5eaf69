//! `collm llm …`: manual checks of a backbone.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use collm_llm::{parse_dtype, Backbone, Mask, Pass};
use serde_json::json;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum LlmCommand {
    /// Next-token logits after a prompt (encoded without special tokens).
    Score(ScoreArgs),
}

#[derive(Args)]
pub struct ScoreArgs {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Comma-separated words whose logits to print; each must encode to exactly one token
    /// (mind the leading space: " Yes, No" means " Yes" and " No").
    #[arg(long)]
    pub tokens: Option<String>,
    /// How many of the highest-scoring tokens to list.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Print {"logits":{word:…},"top":[{"token","id","logit"},…]}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: LlmCommand) -> Result<()> {
    match cmd {
        LlmCommand::Score(a) => {
            let device = collm_llm::device();
            let bb = Backbone::load(&a.model, parse_dtype(&a.dtype)?, &device)?;
            let ids = bb.tokenizer.encode(&a.prompt)?;
            if ids.is_empty() {
                bail!("the prompt encodes to no tokens");
            }
            let words: Vec<String> = a
                .tokens
                .as_deref()
                .map(|s| s.split(',').map(str::to_string).collect())
                .unwrap_or_default();
            let word_ids = words
                .iter()
                .map(|w| bb.tokenizer.single_token(w))
                .collect::<Result<Vec<_>>>()?;
            let dec = &bb.decoder;
            let emb = dec.embed(&ids)?.unsqueeze(0)?;
            let mask = Mask::left_padded(&[ids.len()], ids.len());
            let h = dec.forward(&emb, &mask, &Pass::inference())?;
            let logits = dec.vocab_logits(&h, &[ids.len() - 1])?.to_vec2::<f32>()?;
            let row = &logits[0];
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
            let top: Vec<_> = order
                .iter()
                .take(a.top)
                .map(|&i| {
                    json!({"token": bb.tokenizer.decode(&[i as u32]).unwrap_or_default(),
                        "id": i, "logit": row[i]})
                })
                .collect();
            let mut chosen = serde_json::Map::new();
            for (w, id) in words.iter().zip(&word_ids) {
                chosen.insert(w.clone(), json!(row[*id as usize]));
            }
            if a.json {
                println!("{}", json!({"logits": chosen, "top": top}));
            } else {
                println!("prompt: {} tokens", ids.len());
                for (w, v) in &chosen {
                    println!("{w:?}: {v}");
                }
                println!("top {}:", a.top);
                for t in &top {
                    println!(
                        "  {:>8.3}  {:>6}  {:?}",
                        t["logit"].as_f64().unwrap_or(0.0),
                        t["id"],
                        t["token"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
    }
}
