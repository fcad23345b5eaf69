//! The dataset readers: a split TSV, items.tsv and a whole dataset directory whose manifest
//! is the input's first part (split at the first NUL byte; the rest is train.tsv).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.tsv");
    std::fs::write(&p, data).unwrap();
    let _ = collm_data::dataset::read_split_tsv(&p);
    let _ = collm_data::dataset::read_items_tsv(&p);
    let (manifest, train) = match data.iter().position(|&b| b == 0) {
        Some(k) => (&data[..k], &data[k + 1..]),
        None => (data, &[][..]),
    };
    std::fs::write(dir.path().join("dataset.json"), manifest).unwrap();
    std::fs::write(dir.path().join("train.tsv"), train).unwrap();
    std::fs::write(dir.path().join("items.tsv"), "iid\ttitle\n1\ta\n").unwrap();
    let _ = collm_data::Dataset::load(dir.path());
});
