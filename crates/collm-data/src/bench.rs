//! The data benchmark behind `collm bench amazon-prepare`: `data prepare amazon-book` on a
//! generated Amazon-format input, against a plain line-reading pass over the same file (the
//! I/O floor), measured in the same run.

use crate::sources::amazon;
use anyhow::{Context, Result};
use collm_core::io::LineReader;
use collm_core::machine::peak_rss_mib;
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What the Amazon benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct AmazonBench {
    pub lines: usize,
    pub bytes: u64,
    pub generate_s: f64,
    pub read_s: f64,
    pub prepare_s: f64,
    pub rows_kept: serde_json::Value,
    pub splits: Vec<(String, usize)>,
    pub peak_rss_mib: f64,
    pub peak_rss_after_read_mib: f64,
}

/// Generates (or reuses) `lines` review lines in `dir`, times a plain read and the preparation.
pub fn amazon_prepare(lines: usize, dir: &Path, seed: u64) -> Result<AmazonBench> {
    let t = Instant::now();
    let (reviews, meta) = generate(lines, dir, seed).context("generating the benchmark input")?;
    let generate_s = t.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&reviews)?.len();
    // Baseline: read every line, nothing else.
    let t = Instant::now();
    let mut r = LineReader::open(&reviews)?;
    let mut buf = Vec::new();
    let mut n = 0usize;
    while r.next_bytes(&mut buf)?.is_some() {
        n += 1;
    }
    let read_s = t.elapsed().as_secs_f64();
    let rss_before = peak_rss_mib().unwrap_or(f64::NAN);
    let t = Instant::now();
    let data = amazon::prepare(&reviews, &meta, &amazon::AmazonOptions::default())?;
    let out = dir.join("prepared");
    crate::dataset::write_dataset(data, &out, true)?;
    let prepare_s = t.elapsed().as_secs_f64();
    let m = crate::Dataset::load(&out)?.manifest;
    Ok(AmazonBench {
        lines: n,
        bytes,
        generate_s,
        read_s,
        prepare_s,
        rows_kept: m.source.params["rows_kept"].clone(),
        splits: m.splits.iter().map(|(k, v)| (k.clone(), v.rows)).collect(),
        peak_rss_mib: peak_rss_mib().unwrap_or(f64::NAN),
        peak_rss_after_read_mib: rss_before,
    })
}

impl AmazonBench {
    /// The report `collm bench amazon-prepare` prints.
    pub fn render(&self) -> String {
        let n = self.lines as f64;
        let splits: Vec<String> = self
            .splits
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        format!(
            "input: {} review lines, {:.2} GB (generated in {:.1} s)\n\
kept: {} rows ({})\n\
{:<28} {:>10} {:>14}\n\
{:<28} {:>10.2} {:>14.0}\n\
{:<28} {:>10.2} {:>14.0}\n\
prepare / baseline time ratio: {:.2}x; peak RSS {:.0} MiB (after the baseline pass: {:.0} MiB)\n",
            self.lines,
            self.bytes as f64 / 1e9,
            self.generate_s,
            self.rows_kept,
            splits.join(", "),
            "pass",
            "seconds",
            "lines/s",
            "baseline: read lines",
            self.read_s,
            n / self.read_s,
            "prepare amazon-book",
            self.prepare_s,
            n / self.prepare_s,
            self.prepare_s / self.read_s,
            self.peak_rss_mib,
            self.peak_rss_after_read_mib
        )
    }
}

fn generate(lines: usize, dir: &Path, seed: u64) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let reviews = dir.join(format!("reviews-{}.json", lines));
    let meta = dir.join(format!("meta-{}.json", lines));
    if reviews.is_file() && meta.is_file() {
        return Ok((reviews, meta));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Heavy-tailed users and items, as in the real data; ~30% of reviews in 2017.
    let users = (lines / 12).max(10);
    let items = (lines / 30).max(10);
    let skewed = |rng: &mut ChaCha8Rng, n: usize| (rng.gen::<f64>().powi(3) * n as f64) as usize;
    let tmp = reviews.with_extension("partial");
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    for _ in 0..lines {
        let year_2017 = rng.gen::<f64>() < 0.3;
        let t: i64 = if year_2017 {
            1_483_228_800 + rng.gen_range(0..365 * 86_400)
        } else {
            1_300_000_000 + rng.gen_range(0..180_000_000)
        };
        writeln!(
            w,
            r#"{{"overall": {}.0, "verified": true, "reviewTime": "01 1, 2017", "reviewerID": "A{:X}", "asin": "{:010}", "reviewerName": "Reader", "reviewText": "A fine book, would read again.", "summary": "Good", "unixReviewTime": {t}}}"#,
            rng.gen_range(1..=5),
            skewed(&mut rng, users),
            skewed(&mut rng, items)
        )?;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, &reviews)?;
    let mut w = BufWriter::new(std::fs::File::create(&meta)?);
    for i in 0..items {
        writeln!(
            w,
            r#"{{"asin": "{i:010}", "title": "Book number {i}", "brand": "Someone", "price": "$9.99"}}"#
        )?;
    }
    w.flush()?;
    Ok((reviews, meta))
}
