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
    /// weights, for the shapes of ../shared/bench/ref_lora_throughput.py. Run that script on
    /// the same machine in the same session for the baseline (scripts/bench_llm.sh does both).
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

fn bench_llm(args: &LlmBenchArgs) -> Result<()> {
    use candle_core::{Device, Tensor};
    use collm_llm::load::{bench_shape, random_weights};
    use collm_llm::{parse_dtype, Decoder, Lora, LoraConfig, Mask, Pass};
    use collm_nn::optim::{Adam, Decay};
    use collm_nn::TrainCtx;
    let device = crate::device()?;
    let dtype = parse_dtype(&args.dtype)?;
    let sync = |d: &Device| -> Result<()> {
        d.synchronize()?;
        Ok(())
    };
    let mut rows = Vec::new();
    for item in args.plan.split(',') {
        let (name, batch) = item
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--plan items are model:batch, got '{item}'"))?;
        let batch: usize = batch.parse()?;
        let row = (|| -> Result<serde_json::Value> {
            let cfg = bench_shape(name)?;
            let dec = Decoder::new(&cfg, &random_weights(&cfg, dtype, &device)?, dtype, &device)?;
            let lora = Lora::new(&LoraConfig::default(), &cfg, 0, &device)?;
            let params = lora
                .trainable()
                .into_iter()
                .map(|(n, v)| (n, v, 1e-3))
                .collect();
            let mut opt = Adam::new(params, 1e-4, Decay::Decoupled)?;
            let mut rng = ChaCha8Rng::seed_from_u64(0);
            let ids: Vec<u32> = (0..batch * args.seq)
                .map(|_| rng.gen_range(10..cfg.vocab_size as u32))
                .collect();
            let labels = Tensor::from_vec(
                (0..batch).map(|k| (k % 2) as f32).collect::<Vec<_>>(),
                batch,
                &device,
            )?;
            let mask = Mask::left_padded(&vec![args.seq; batch], args.seq);
            let last = mask.last_positions();
            let emb = dec
                .embed(&ids)?
                .reshape((batch, args.seq, cfg.hidden_size))?;
            let ctx = TrainCtx::new(1);
            let train_step = |opt: &mut Adam| -> Result<()> {
                let pass = Pass {
                    lora: Some(&lora),
                    train: Some(&ctx),
                    grad: true,
                };
                let h = dec.forward(&emb, &mask, &pass)?;
                let yes = dec.token_logits(&h, &last, &[3], &pass)?.squeeze(1)?;
                let loss = collm_nn::layers::bce_with_logits(&yes, &labels)?;
                opt.step(&loss.backward()?)?;
                Ok(())
            };
            let score = || -> Result<()> {
                let pass = Pass {
                    lora: Some(&lora),
                    train: None,
                    grad: false,
                };
                let h = dec.forward(&emb, &mask, &pass)?;
                dec.token_logits(&h, &last, &[4, 3], &pass)?
                    .to_vec2::<f32>()?;
                Ok(())
            };
            for _ in 0..args.warm {
                train_step(&mut opt)?;
            }
            sync(&device)?;
            let t = Instant::now();
            for _ in 0..args.steps {
                train_step(&mut opt)?;
            }
            sync(&device)?;
            let train_s = t.elapsed().as_secs_f64() / args.steps as f64;
            for _ in 0..args.warm {
                score()?;
            }
            sync(&device)?;
            let t = Instant::now();
            for _ in 0..args.steps {
                score()?;
            }
            sync(&device)?;
            let infer_s = t.elapsed().as_secs_f64() / args.steps as f64;
            let row = serde_json::json!({
                "model": name, "batch": batch, "seq": args.seq, "dtype": args.dtype,
                "device": format!("{device:?}"),
                "train_samples_per_s": batch as f64 / train_s,
                "infer_samples_per_s": batch as f64 / infer_s,
                "peak_rss_gib": peak_rss_mib().map(|m| m / 1024.0),
            });
            Ok(row)
        })();
        match row {
            Ok(row) => {
                println!("{row}");
                rows.push(row);
            }
            // Keep going: one out-of-memory shape must not lose the other rows.
            Err(e) => println!(
                "{}",
                serde_json::json!({"model": name, "batch": batch, "error": format!("{e:#}")})
            ),
        }
    }
    println!("\nmodel                 batch  train/s   infer/s  peak RSS GiB");
    for r in &rows {
        println!(
            "{:<21} {:>5} {:>8.2} {:>9.2} {:>8.2}",
            r["model"].as_str().unwrap_or(""),
            r["batch"],
            r["train_samples_per_s"].as_f64().unwrap_or(0.0),
            r["infer_samples_per_s"].as_f64().unwrap_or(0.0),
            r["peak_rss_gib"].as_f64().unwrap_or(f64::NAN)
        );
    }
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
