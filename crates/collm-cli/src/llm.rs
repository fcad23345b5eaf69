//! `collm llm …`: manual checks of a backbone.

use anyhow::Result;
use clap::{Args, Subcommand};
use collm_llm::{parse_dtype, Backbone};
use serde_json::json;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum LlmCommand {
    /// Next-token logits after a prompt (encoded without special tokens).
    Score(ScoreArgs),
    /// The kernel this process multiplies the frozen projections with (COLLM_KERNEL=auto|f32|
    /// bf16|amx|emulated; auto: AMX-BF16, else AVX512-BF16, else f32), this CPU, and whether
    /// subnormal floats are flushed to zero (COLLM_DENORMALS=flush|keep).
    Kernel(KernelArgs),
}

#[derive(Args)]
pub struct KernelArgs {
    /// Print only the kernel's name (f32, bf16, amx, emulated).
    #[arg(long)]
    pub short: bool,
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
        LlmCommand::Kernel(a) => {
            let choice = collm_llm::ops::kernel_choice().map_err(anyhow::Error::msg)?;
            if a.short {
                println!("{}", choice.kernel.name());
            } else {
                println!("kernel: {}", choice.describe());
                println!("cpu: {}", collm_core::machine::cpu_description());
                println!("denormals: {}", collm_core::denormals::describe());
            }
            Ok(())
        }
        LlmCommand::Score(a) => {
            let bb = Backbone::load(&a.model, parse_dtype(&a.dtype)?, &collm_llm::device())?;
            let words: Vec<String> = a
                .tokens
                .as_deref()
                .map(|s| s.split(',').map(str::to_string).collect())
                .unwrap_or_default();
            let r = bb.next_token_logits(&a.prompt, &words, a.top)?;
            if a.json {
                let chosen: serde_json::Map<String, serde_json::Value> =
                    r.words.iter().map(|(w, v)| (w.clone(), json!(v))).collect();
                let top: Vec<_> = r
                    .top
                    .iter()
                    .map(|(t, id, v)| json!({"token": t, "id": id, "logit": v}))
                    .collect();
                println!("{}", json!({"logits": chosen, "top": top}));
            } else {
                println!("prompt: {} tokens", r.prompt_tokens);
                for (w, v) in &r.words {
                    println!("{w:?}: {v}");
                }
                println!("top {}:", a.top);
                for (t, id, v) in &r.top {
                    println!("  {v:>8.3}  {id:>6}  {t:?}");
                }
            }
            Ok(())
        }
    }
}
