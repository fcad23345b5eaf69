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
    /// LLM scoring and LoRA train-step throughput (forward + backward + AdamW) with random
    /// weights, for the shapes of ../shared/bench/ref_lora_throughput.py: samples and tokens/s,
    /// the train step split into host prep / forward / backward / optimizer, peak RSS. Run that
    /// script on the same machine in the same run for the baseline (scripts/bench_llm.sh does
    /// both and prints the ratios).
    Llm(LlmBenchArgs),
    /// Collaborative-model training and scoring throughput on a dataset, one row per model:
    /// seconds per epoch, train and valid-scoring samples/s, and the epoch as a multiple of a
    /// gradient-free forward pass over the train split (the baseline, measured in the same run).
    Cf(CfBenchArgs),
}

#[derive(Args)]
pub struct CfBenchArgs {
    /// Dataset directory (e.g. data/ml-1m-collm).
    #[arg(long)]
    pub data: PathBuf,
    /// Comma-separated models to measure.
    #[arg(long, default_value = "mf,lightgcn,sasrec,din")]
    pub models: String,
    /// Directory with cf-<model>.toml configs (the committed tuned ones by default); a model
    /// without a file there runs with its defaults.
    #[arg(long, default_value = "configs/ml-1m")]
    pub configs: PathBuf,
    /// Training epochs to time per model.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
}

#[derive(Args)]
pub struct LlmBenchArgs {
    /// Comma-separated model:batch pairs (shapes: tiny, smollm2-135m, qwen2.5-0.5b-shape, vicuna-7b).
    #[arg(long, default_value = "smollm2-135m:8")]
    pub plan: String,
    #[arg(long, default_value_t = 160)]
    pub seq: usize,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warm: usize,
    /// Which engine path: `fused` (the CPU kernels, the default there), `composed` (candle's
    /// plain ops: the path before the fused kernels, and the only one on CUDA) or `both`
    /// (composed then fused, same run: the before/after comparison).
    #[arg(long, default_value = "fused")]
    pub path: String,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    pub json: bool,
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

pub use collm_llm::bench::peak_rss_mib;

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

fn bench_llm(args: &LlmBenchArgs) -> Result<()> {
    use collm_llm::bench::{measure, LlmBench};
    let device = collm_llm::device();
    let dtype = collm_llm::parse_dtype(&args.dtype)?;
    let paths: Vec<bool> = match args.path.as_str() {
        "fused" => vec![true],
        "composed" => vec![false],
        "both" => vec![false, true],
        other => anyhow::bail!("--path is fused, composed or both, got '{other}'"),
    };
    let mut rows = Vec::new();
    for item in args.plan.split(',') {
        let (name, batch) = item
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--plan items are model:batch, got '{item}'"))?;
        let batch: usize = batch
            .parse()
            .with_context(|| format!("--plan: batch of '{item}'"))?;
        for &fused in &paths {
            let bench = LlmBench {
                model: name.to_string(),
                batch,
                seq: args.seq,
                dtype,
                steps: args.steps,
                warm: args.warm,
                fused: fused && device.is_cpu(),
            };
            match measure(&bench, &device) {
                Ok(row) => {
                    if args.json {
                        println!("{}", serde_json::to_string(&row)?);
                    }
                    rows.push(row);
                }
                // Keep going: one out-of-memory shape must not lose the other rows.
                Err(e) => {
                    let msg = format!("{e:#}");
                    if args.json {
                        println!(
                            "{}",
                            serde_json::json!({"model": name, "batch": batch, "error": msg})
                        );
                    } else {
                        eprintln!("{name}:{batch}: {msg}");
                    }
                }
            }
        }
    }
    if args.json {
        return Ok(());
    }
    println!(
        "{:<20} {:>5} {:>4} {:<8} {:>8} {:>9} {:>8} {:>9}  {:>5} {:>5} {:>5} {:>5}  {:>9}",
        "model",
        "batch",
        "seq",
        "path",
        "train/s",
        "tok/s",
        "score/s",
        "tok/s",
        "prep",
        "fwd",
        "bwd",
        "opt",
        "peak GiB"
    );
    for r in &rows {
        let s = &r.step;
        let total = s.prep_s + s.forward_s + s.backward_s + s.optimizer_s;
        let pct = |x: f64| 100.0 * x / total;
        println!(
            "{:<20} {:>5} {:>4} {:<8} {:>8.2} {:>9.0} {:>8.2} {:>9.0}  {:>4.0}% {:>4.0}% {:>4.0}% {:>4.0}%  {:>9.2}",
            r.model,
            r.batch,
            r.seq,
            r.path,
            r.train_samples_per_s,
            r.train_tokens_per_s,
            r.infer_samples_per_s,
            r.infer_tokens_per_s,
            pct(s.prep_s),
            pct(s.forward_s),
            pct(s.backward_s),
            pct(s.optimizer_s),
            r.peak_rss_train_gib.unwrap_or(f64::NAN)
        );
    }
    println!(
        "({} {}, {} threads; step shares: host prep, forward, backward, optimizer; peak RSS of the train steps)",
        args.dtype,
        rows.first().map_or("", |r| r.device.as_str()),
        rows.first().map_or(0, |r| r.threads)
    );
    Ok(())
}

fn bench_cf(args: &CfBenchArgs) -> Result<()> {
    use collm_cf::{CfConfig, ModelKind};
    let ds = collm_data::Dataset::load(&args.data)?;
    let mut rows = Vec::new();
    for name in args.models.split(',').map(str::trim) {
        let kind: ModelKind = name.parse().map_err(|e| anyhow::anyhow!("--models: {e}"))?;
        let file = args.configs.join(format!("cf-{}.toml", kind.name()));
        let cfg = if file.is_file() {
            CfConfig::load(&file)?
        } else {
            tracing::warn!(
                "{}: not found, {name} runs with its defaults",
                file.display()
            );
            CfConfig::defaults(kind)
        };
        let row = collm_cf::bench::measure(&cfg, &ds, args.epochs)?;
        println!("{}", serde_json::to_string(&row)?);
        rows.push(row);
    }
    println!(
        "\n{} train rows, {} valid rows, {} epoch(s) each",
        rows.first().map_or(0, |r| r.train_rows),
        rows.first().map_or(0, |r| r.valid_rows),
        args.epochs
    );
    println!(
        "{:<9} {:>4} {:>6} {:>9} {:>12} {:>11} {:>10} {:>12}",
        "model", "d", "batch", "s/epoch", "train rows/s", "forward s", "epoch/fwd", "score rows/s"
    );
    for r in &rows {
        println!(
            "{:<9} {:>4} {:>6} {:>9.2} {:>12.0} {:>11.3} {:>9.1}x {:>12.0}",
            r.model,
            r.dim,
            r.batch_size,
            r.epoch_seconds,
            r.train_samples_per_second,
            r.forward_seconds,
            r.epoch_over_forward,
            r.score_samples_per_second
        );
    }
    Ok(())
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Llm(args) => bench_llm(&args),
        BenchCommand::Cf(args) => bench_cf(&args),
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
