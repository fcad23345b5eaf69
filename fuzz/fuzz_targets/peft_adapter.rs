//! The PEFT adapter reader (adapter_config.json + adapter_model.safetensors): the input is
//! split at its first NUL byte into the JSON and the safetensors file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (json, st) = match data.iter().position(|&b| b == 0) {
        Some(k) => (&data[..k], &data[k + 1..]),
        None => (data, &[][..]),
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), json).unwrap();
    std::fs::write(dir.path().join("adapter_model.safetensors"), st).unwrap();
    let cfg = collm_llm::load::bench_shape("tiny").expect("the tiny shape");
    let _ = collm_llm::lora::Lora::load_peft(dir.path(), &cfg, &candle_core::Device::Cpu);
});
