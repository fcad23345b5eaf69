//! What the decoder tests share: the tiny transformers-made fixtures as decoders.

use candle_core::{DType, Device, Tensor};
use collm_llm::load::load_hf_dir;
use collm_llm::Decoder;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fixture model `name` (tiny-llama, tiny-qwen2) as an f32 CPU decoder.
#[allow(dead_code)] // not every test file that shares this module uses it
pub fn tiny(name: &str) -> Decoder {
    let ck = load_hf_dir(&fixtures().join(name), DType::F32, &Device::Cpu).unwrap();
    Decoder::new(&ck.config, &ck.weights, DType::F32, &Device::Cpu).unwrap()
}

/// The largest absolute difference between two tensors of one shape.
#[allow(dead_code)] // not every test file that shares this module compares tensors
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
