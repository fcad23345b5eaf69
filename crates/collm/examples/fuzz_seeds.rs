//! Seed corpora for the fuzz targets (`fuzz/`), made the way the tests make their fixtures: a
//! tiny llama GGUF, a PEFT adapter written by collm, a synthetic dataset's files, and the
//! shipped configs. `cargo run --release -p collm --example fuzz_seeds` (scripts/fuzz.sh runs
//! it); it writes fuzz/corpus/<target>/.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = repo.join("fuzz/corpus");
    let dir = |t: &str| {
        let d = root.join(t);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    // gguf: a complete tiny llama (one tensor, a 2-token vocabulary), f32 and q8_0.
    for (name, dtype) in [
        ("tiny-f32.gguf", GgmlDType::F32),
        ("tiny-q8.gguf", GgmlDType::Q8_0),
    ] {
        use gguf_file::Value;
        let t = Tensor::full(0.25f32, (2, 32), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let u = |v: u32| Value::U32(v);
        let meta: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", u(32)),
            ("llama.attention.head_count", u(2)),
            ("llama.feed_forward_length", u(64)),
            ("llama.block_count", u(1)),
            ("llama.context_length", u(64)),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
            (
                "tokenizer.ggml.merges",
                Value::Array(vec![Value::String("a b".into())]),
            ),
        ];
        let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let mut f = std::fs::File::create(dir("gguf").join(name)).unwrap();
        gguf_file::write(&mut f, &refs, &[("token_embd.weight", &q)]).unwrap();
    }
    // peft_adapter: adapter_config.json, NUL, adapter_model.safetensors.
    let tmp = tempfile::tempdir().unwrap();
    let model = collm_llm::load::bench_shape("tiny").unwrap();
    let lcfg = collm_llm::lora::LoraConfig::default();
    let lora = collm_llm::lora::Lora::new(&lcfg, &model, 1, &Device::Cpu).unwrap();
    lora.save_peft(tmp.path(), "tiny").unwrap();
    let mut seed = std::fs::read(tmp.path().join("adapter_config.json")).unwrap();
    seed.push(0);
    seed.extend(std::fs::read(tmp.path().join("adapter_model.safetensors")).unwrap());
    std::fs::write(dir("peft_adapter").join("collm-adapter"), seed).unwrap();
    // dataset_tsv: a synthetic dataset's files; dataset.json NUL train.tsv.
    let data = collm_data::sources::synthetic::prepare(
        &collm_data::sources::synthetic::SyntheticOptions {
            users: 6,
            items: 8,
            rows_per_user: 4.0,
            ..Default::default()
        },
    )
    .unwrap();
    let ds_dir = tmp.path().join("ds");
    collm_data::dataset::write_dataset(data, &ds_dir, false).unwrap();
    let d = dir("dataset_tsv");
    for f in ["train.tsv", "valid.tsv", "items.tsv"] {
        std::fs::copy(ds_dir.join(f), d.join(f)).unwrap();
    }
    let mut seed = std::fs::read(ds_dir.join("dataset.json")).unwrap();
    seed.push(0);
    seed.extend(std::fs::read(ds_dir.join("train.tsv")).unwrap());
    std::fs::write(d.join("manifest-and-train"), seed).unwrap();
    // config: the shipped configs.
    let c = dir("config");
    let configs = repo.join("configs/ml-1m");
    for e in std::fs::read_dir(configs).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, c.join(p.file_name().unwrap())).unwrap();
    }
    println!("seed corpora in {}", root.display());
}
