//! collm's decoder against Hugging Face transformers (fixtures made by
//! scripts/make_llm_fixtures.py): logits within 1e-4 in f32, alone and in padded batches,
//! for a LLaMA (tied embeddings, llama3 RoPE scaling), a Qwen2 (q/k/v biases, untied head)
//! and a PEFT LoRA adapter.

mod common;

use candle_core::{DType, Device, Tensor};
use collm_llm::load::load_hf_dir;
use collm_llm::{Decoder, Lora, LoraConfig, Mask, Pass};
use common::{fixtures, tiny};
use std::path::Path;

struct Expected {
    seqs: Vec<Vec<u32>>,
    logits: serde_json::Value,
}

fn expected() -> Expected {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("logits.json")).unwrap())
            .unwrap();
    let seqs = v["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    Expected { seqs, logits: v }
}

fn want(e: &Expected, model: &str, seq: usize, pos: usize) -> Vec<f32> {
    e.logits[model][seq][pos]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check(model: &str, dec: &Decoder, lora: Option<&Lora>) {
    let e = expected();
    let pass = Pass {
        lora,
        train: None,
        grad: false,
    };
    // Each sequence alone: every position.
    for (k, s) in e.seqs.iter().enumerate() {
        let emb = dec.embed(s).unwrap().unsqueeze(0).unwrap();
        let mask = Mask::left_padded(&[s.len()], s.len());
        let h = dec.forward(&emb, &mask, &pass).unwrap();
        for pos in 0..s.len() {
            let got = dec
                .vocab_logits(&h, &[pos])
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let d = max_diff(&got[0], &want(&e, model, k, pos));
            assert!(d < 1e-4, "{model}: seq {k} pos {pos}: max diff {d}");
        }
    }
    // Padded batches, left and right: the last real position of each row.
    let lens: Vec<usize> = e.seqs.iter().map(Vec::len).collect();
    let t = *lens.iter().max().unwrap();
    for left in [true, false] {
        let mut ids = Vec::new();
        for s in &e.seqs {
            let pad = vec![0u32; t - s.len()];
            if left {
                ids.extend(&pad);
                ids.extend(s);
            } else {
                ids.extend(s);
                ids.extend(&pad);
            }
        }
        let emb = dec
            .embed(&ids)
            .unwrap()
            .reshape((e.seqs.len(), t, dec.hidden_size()))
            .unwrap();
        let mask = if left {
            Mask::left_padded(&lens, t)
        } else {
            Mask::right_padded(&lens, t)
        };
        let h = dec.forward(&emb, &mask, &pass).unwrap();
        let last = mask.last_positions();
        let got = dec
            .vocab_logits(&h, &last)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (k, s) in e.seqs.iter().enumerate() {
            let d = max_diff(&got[k], &want(&e, model, k, s.len() - 1));
            assert!(d < 1e-4, "{model} (left={left}): row {k}: max diff {d}");
            assert!(got[k].iter().all(|x| x.is_finite()));
        }
        // Only chosen tokens: the same numbers.
        let ids = [3u32, 40, 95];
        let few = dec
            .token_logits(&h, &last, &ids, &Pass::inference())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        if lora.is_none() {
            for k in 0..e.seqs.len() {
                for (j, &id) in ids.iter().enumerate() {
                    assert!((few[k][j] - got[k][id as usize]).abs() < 1e-5);
                }
            }
        }
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    check("tiny-llama", &tiny("tiny-llama"), None);
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check("tiny-qwen2", &tiny("tiny-qwen2"), None);
}

#[test]
fn peft_adapter_loads_and_matches_transformers_with_peft() {
    let dec = tiny("tiny-llama");
    let lora = Lora::load_peft(
        &fixtures().join("tiny-llama-lora"),
        &dec.config,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(lora.config.r, 4);
    assert_eq!(lora.config.scaling(), 2.0);
    check("tiny-llama-lora", &dec, Some(&lora));

    // Saved by us: PEFT's file layout and key names, and it loads back to the same numbers.
    let tmp = tempfile::tempdir().unwrap();
    lora.save_peft(tmp.path(), "tiny-llama").unwrap();
    let ours =
        candle_core::safetensors::load(tmp.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let theirs = candle_core::safetensors::load(
        fixtures().join("tiny-llama-lora/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut a: Vec<_> = ours.keys().cloned().collect();
    let mut b: Vec<_> = theirs.keys().cloned().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for k in &a {
        let d = (&ours[k] - &theirs[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{k}");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);

    // Every adapter feature collm does not implement is refused, naming the key.
    let good = cfg.clone();
    for (key, value) in [
        ("use_dora", serde_json::json!(true)),
        ("use_rslora", serde_json::json!(true)),
        ("fan_in_fan_out", serde_json::json!(true)),
        ("alpha_pattern", serde_json::json!({"q_proj": 32})),
        ("rank_pattern", serde_json::json!({"v_proj": 2})),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("layers_to_transform", serde_json::json!([0])),
        ("bias", serde_json::json!("lora_only")),
    ] {
        let mut bad = good.clone();
        bad[key] = value;
        std::fs::write(
            tmp.path().join("adapter_config.json"),
            serde_json::to_string(&bad).unwrap(),
        )
        .unwrap();
        let e = match Lora::load_peft(tmp.path(), &dec.config, &Device::Cpu) {
            Ok(_) => panic!("{key}: accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            e.contains("adapter_config.json") && e.contains(key),
            "{key}: {e}"
        );
    }
    // Empty patterns and null lists are what PEFT writes for a plain adapter: accepted.
    let mut plain = good.clone();
    plain["alpha_pattern"] = serde_json::json!({});
    plain["rank_pattern"] = serde_json::json!({});
    plain["modules_to_save"] = serde_json::Value::Null;
    std::fs::write(
        tmp.path().join("adapter_config.json"),
        serde_json::to_string(&plain).unwrap(),
    )
    .unwrap();
    Lora::load_peft(tmp.path(), &dec.config, &Device::Cpu).unwrap();
}

#[test]
fn peft_base_names_are_hub_names_or_directories() {
    use collm_llm::lora::peft_base_name;
    assert_eq!(
        peft_base_name(std::path::Path::new(
            "models/SmolLM2-135M-Instruct.Q4_1.gguf"
        )),
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );
    assert_eq!(
        peft_base_name(std::path::Path::new("x/my-model.gguf")),
        "my-model"
    );
    let d = fixtures().join("tiny-llama");
    assert_eq!(
        peft_base_name(&d),
        d.canonicalize().unwrap().display().to_string()
    );
}

#[test]
fn bad_checkpoints_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("tiny-llama");
    let msg = |d: &Path| match load_hf_dir(d, DType::F32, &Device::Cpu) {
        Err(e) => format!("{e:#}"),
        Ok(ck) => match Decoder::new(&ck.config, &ck.weights, DType::F32, &Device::Cpu) {
            Err(e) => format!("{e:#}"),
            Ok(_) => panic!("should fail"),
        },
    };
    // No config.
    assert!(msg(&dir).contains("config.json"));
    // Unsupported architecture.
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .unwrap();
    assert!(msg(&dir).contains("unsupported architecture 'GPT2LMHeadModel'"));
    // Missing weights file, corrupt file, missing tensor, wrong shape.
    std::fs::write(dir.join("config.json"), &cfg).unwrap();
    assert!(msg(&dir).contains("no model.safetensors"));
    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file").unwrap();
    assert!(msg(&dir).contains("corrupt or truncated"));
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    t.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let e = msg(&dir);
    assert!(
        e.contains("'model.layers.1.mlp.up_proj.weight' is missing"),
        "{e}"
    );
    t.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        Tensor::zeros((63, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let e = msg(&dir);
    assert!(
        e.contains("has shape [63, 32]") && e.contains("[64, 32]"),
        "{e}"
    );
    // A LoRA config naming an unknown module.
    let bad = LoraConfig {
        target_modules: vec!["qkv".into()],
        ..Default::default()
    };
    assert!(
        format!("{:#}", bad.validate().unwrap_err()).contains("unknown LoRA target module 'qkv'")
    );
}
