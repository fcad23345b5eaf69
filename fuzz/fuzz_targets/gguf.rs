//! The GGUF reader: any bytes give a model or an error, never a panic or an unbounded
//! allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = std::io::Cursor::new(data);
    let _ = collm_llm::load::read_gguf(
        &mut r,
        std::path::Path::new("fuzz.gguf"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    );
});
