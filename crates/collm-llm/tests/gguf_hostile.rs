//! Hostile and corrupt GGUF files are refused with an error naming the file and the tensor,
//! never a panic, an unbounded allocation, or NaN weights that score.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

const NAME: &str = "token_embd.weight";

/// A tiny but complete llama GGUF: config metadata, a 2-token vocabulary, one f32 tensor
/// (2 x 8) filled with 0.25.
fn write_tiny(dir: &Path, alignment: Option<u32>) -> PathBuf {
    use gguf_file::Value;
    let p = dir.join("tiny.gguf");
    let mut f = std::fs::File::create(&p).unwrap();
    let t = Tensor::full(0.25f32, (2, 8), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let u = |v: u32| Value::U32(v);
    let mut meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", u(8)),
        ("llama.attention.head_count", u(2)),
        ("llama.attention.head_count_kv", u(2)),
        ("llama.feed_forward_length", u(16)),
        ("llama.block_count", u(1)),
        ("llama.context_length", u(64)),
        ("llama.vocab_size", u(2)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        ),
    ];
    if let Some(a) = alignment {
        meta.push(("general.alignment", u(a)));
    }
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut f, &refs, &[(NAME, &q)]).unwrap();
    p
}

/// The byte offset of the tensor info's dimension count (right after its name).
fn dims_offset(bytes: &[u8]) -> usize {
    let name = NAME.as_bytes();
    let at = bytes
        .windows(name.len())
        .rposition(|w| w == name)
        .expect("tensor name in the file");
    at + name.len()
}

fn load(p: &Path) -> anyhow::Result<collm_llm::load::Checkpoint> {
    collm_llm::load::load(p, DType::F32, &Device::Cpu)
}

fn err(p: &Path) -> String {
    match load(p) {
        Ok(_) => panic!("{} should have been refused", p.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn the_untouched_file_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_tiny(tmp.path(), None);
    let ck = load(&p).unwrap();
    let t = ck.weights.tensors.get("model.embed_tokens.weight").unwrap();
    assert_eq!(t.dims(), &[2, 8]);
}

#[test]
fn overflowing_or_huge_dimensions_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_tiny(tmp.path(), None);
    let good = std::fs::read(&p).unwrap();
    let at = dims_offset(&good);
    assert_eq!(u32::from_le_bytes(good[at..at + 4].try_into().unwrap()), 2);
    for dims in [[1u64 << 62, 1], [1 << 33, 1 << 33], [0, 8], [3, 8]] {
        let mut b = good.clone();
        b[at + 4..at + 12].copy_from_slice(&dims[1].to_le_bytes());
        b[at + 12..at + 20].copy_from_slice(&dims[0].to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let e = err(&p);
        assert!(e.contains("tiny.gguf") && e.contains(NAME), "{dims:?}: {e}");
    }
}

#[test]
fn nan_or_inf_weights_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_tiny(tmp.path(), None);
    let good = std::fs::read(&p).unwrap();
    // The tensor data is the file's tail: 16 f32s of 0.25.
    let data = good.len() - 16 * 4;
    assert_eq!(&good[data..data + 4], &0.25f32.to_le_bytes());
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut b = good.clone();
        b[data + 20..data + 24].copy_from_slice(&bad.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let e = err(&p);
        assert!(
            e.contains("tiny.gguf") && e.contains(NAME) && e.contains("NaN or infinite"),
            "{e}"
        );
    }
}

#[test]
fn a_zero_alignment_or_a_truncated_file_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_tiny(tmp.path(), Some(0));
    let e = err(&p);
    assert!(e.contains("tiny.gguf"), "{e}");
    let p = write_tiny(tmp.path(), None);
    let good = std::fs::read(&p).unwrap();
    for cut in [4, 40, good.len() / 2, good.len() - 1] {
        std::fs::write(&p, &good[..cut]).unwrap();
        let e = err(&p);
        assert!(e.contains("tiny.gguf"), "cut at {cut}: {e}");
    }
}

/// The case on the real backbone (when it has been fetched): 4 KB of garbage at
/// offset 10 MB.
#[test]
fn a_corrupted_smollm2_is_refused() {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !src.is_file() {
        eprintln!("skipped: {} not fetched", src.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.gguf");
    let mut b = std::fs::read(&src).unwrap();
    let mut x = 0x9e37_79b9_u32;
    for byte in &mut b[10 << 20..(10 << 20) + 4096] {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *byte = x as u8;
    }
    std::fs::write(&p, &b).unwrap();
    let e = err(&p);
    assert!(
        e.contains("bad.gguf") && e.contains("NaN or infinite"),
        "{e}"
    );
}

/// Inputs the fuzzer (`fuzz/`, target `gguf`) found, each once a panic: every one is now an
/// error naming the file.
#[test]
fn fuzzer_findings_are_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("gguf-")
        {
            let e = err(&p);
            assert!(e.contains(p.to_str().unwrap()), "{e}");
            n += 1;
        }
    }
    assert!(n >= 1);
}
