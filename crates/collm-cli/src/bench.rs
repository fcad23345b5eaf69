//! `collm bench …`: throughput and memory benchmarks. Numbers are printed next to a baseline
//! measured in the same run on the same input, because the machines are shared and noisy.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use collm_data::io::LineReader;
use collm_data::sources::amazon;
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// `data prepare amazon-book` on a generated Amazon-format input: rows/s and peak memory,
    /// against a plain line-reading pass over the same file (the I/O floor).
    AmazonPrepare(AmazonBenchArgs),
}

#[derive(Args)]
pub struct AmazonBenchArgs {
    /// Review lines to generate.
    #[arg(long, default_value_t = 10_000_000)]
    pub lines: usize,
    /// Where to write the generated files (kept for reruns: generation is skipped when the
    /// files exist).
    #[arg(long, default_value = "target/bench-amazon")]
    pub dir: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Peak resident memory of this process so far (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn generate(args: &AmazonBenchArgs) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(&args.dir)?;
    let reviews = args.dir.join(format!("reviews-{}.json", args.lines));
    let meta = args.dir.join(format!("meta-{}.json", args.lines));
    if reviews.is_file() && meta.is_file() {
        return Ok((reviews, meta));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    // Heavy-tailed users and items, as in the real data; ~30% of reviews in 2017.
    let users = (args.lines / 12).max(10);
    let items = (args.lines / 30).max(10);
    let skewed = |rng: &mut ChaCha8Rng, n: usize| (rng.gen::<f64>().powi(3) * n as f64) as usize;
    let tmp = reviews.with_extension("partial");
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    for _ in 0..args.lines {
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

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::AmazonPrepare(args) => {
            let t = Instant::now();
            let (reviews, meta) = generate(&args).context("generating the benchmark input")?;
            let gen_s = t.elapsed().as_secs_f64();
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
            let out = args.dir.join("prepared");
            collm_data::dataset::write_dataset(data, &out, true)?;
            let prep_s = t.elapsed().as_secs_f64();
            let rss = peak_rss_mib().unwrap_or(f64::NAN);
            let m = collm_data::Dataset::load(&out)?.manifest;
            println!(
                "input: {n} review lines, {:.2} GB (generated in {gen_s:.1} s)",
                bytes as f64 / 1e9
            );
            println!(
                "kept: {} rows ({:?})",
                m.source.params["rows_kept"],
                m.splits
                    .iter()
                    .map(|(k, v)| format!("{k} {}", v.rows))
                    .collect::<Vec<_>>()
            );
            println!("{:<28} {:>10} {:>14}", "pass", "seconds", "lines/s");
            println!(
                "{:<28} {:>10.2} {:>14.0}",
                "baseline: read lines",
                read_s,
                n as f64 / read_s
            );
            println!(
                "{:<28} {:>10.2} {:>14.0}",
                "prepare amazon-book",
                prep_s,
                n as f64 / prep_s
            );
            println!(
                "prepare / baseline time ratio: {:.2}x; peak RSS {:.0} MiB (after the baseline pass: {:.0} MiB)",
                prep_s / read_s,
                rss,
                rss_before
            );
            Ok(())
        }
    }
}
