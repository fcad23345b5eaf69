//! The config parsers: an experiment TOML (also a run's config.toml) and a CF model TOML.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("exp.toml");
    std::fs::write(&p, text).unwrap();
    if let Ok(c) = collm::ExperimentConfig::load(&p) {
        // A valid config's schedule is defined at every step.
        for t in [0, 1, c.training.warmup_steps, c.training.max_steps] {
            assert!(c.lr_at(t).is_finite(), "lr_at({t})");
        }
    }
    let _ = collm_cf::CfConfig::from_toml(text, "fuzz");
});
