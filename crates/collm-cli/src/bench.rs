//! `collm bench …`: throughput and memory benchmarks. Numbers are printed next to a baseline
//! measured in the same run on the same input, because the machines are shared and noisy.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// `data prepare amazon-book` on a generated Amazon-format input: rows/s and peak memory,
    /// against a plain line-reading pass over the same file (the I/O floor).
    AmazonPrepare(AmazonBenchArgs),
    /// LLM scoring and LoRA train-step throughput (forward + backward + AdamW) with random
    /// weights, for the shapes of ../shared/bench/ref_lora_throughput.py: samples and tokens/s,
    /// the train step split into host prep / forward / backward / optimizer, peak RSS, and the
    /// FLOP rates next to this CPU's f32 matmul rate measured in the same run (the ceiling of
    /// any f32 engine here). Run that script on the same machine in the same run for the
    /// baseline (scripts/bench_llm.sh does both and prints the ratios).
    Llm(LlmBenchArgs),
    /// Collaborative-model training and scoring throughput on a dataset, one row per model:
    /// seconds per epoch, train and valid-scoring samples/s, and the epoch as a multiple of a
    /// gradient-free forward pass over the train split (the baseline, measured in the same run).
    Cf(CfBenchArgs),
    /// Training epochs from a trained collaborative run's weights with subnormal floats kept
    /// and flushed to zero (what the binary does; COLLM_DENORMALS), in the same run: how many
    /// of the weights are subnormal, seconds per epoch each way (best of two, alternating), the
    /// speedup, and the last epoch's loss each way.
    Denormals(DenormalsBenchArgs),
    /// A CoLLM training step and evaluation on a dataset's own prompts, each through the
    /// whole-prompt path and the work-saving one in the same run: train samples/s with and
    /// without the frozen prefix (step-2 modes run the text before the first ID slot as
    /// inference), evaluation rows/s with whole prompts and with shared prefixes, their
    /// max |diff|, and the predicted hours per 1,000 steps and per full valid pass.
    Train(TrainBenchArgs),
    /// Shared-prefix scoring against whole prompts, same run, same rows: one user's
    /// candidates scored both ways; prints {"full_s","prefix_s","speedup","max_abs_diff"}.
    Rank(RankBenchArgs),
    /// Load on a running `collm serve` (loopback): N seeded requests (3/4 score, 1/4 rank) from
    /// C concurrent keep-alive connections; throughput, p50/p99 latency, count of each status.
    /// scripts/load_test.sh starts the server, runs this and checks the server afterwards.
    Serve(ServeBenchArgs),
}

#[derive(Args)]
pub struct TrainBenchArgs {
    /// A run config (e.g. configs/ml-1m/collm-mf.toml): data, backbone, CF run, step 1, batch.
    #[arg(long)]
    pub config: PathBuf,
    /// Override the config's mode (e.g. t2, uitoken, tallrec).
    #[arg(long)]
    pub mode: Option<String>,
    /// Override the config's dataset directory.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Override the config's batch size.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Timed optimizer steps per path.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed steps first, per path.
    #[arg(long, default_value_t = 1)]
    pub warm: usize,
    /// Valid rows scored per evaluation path: the split's first rows (sorted by user and time,
    /// as a full pass sees them).
    #[arg(long, default_value_t = 600)]
    pub eval_rows: usize,
    /// Also time each fused CPU op during the timed steps of the path a run trains with (the
    /// frozen prefix where the mode has one) and during the shared-prefix evaluation, and print
    /// both split by op: where a row's hours go.
    #[arg(long)]
    pub op_times: bool,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RankBenchArgs {
    /// Run directory (a CoLLM run; a collaborative-model run scores the same both ways).
    #[arg(long)]
    pub run: PathBuf,
    /// Dataset directory (needed by a collaborative-model run).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    pub candidates: usize,
    /// The user (default: the first with enough unseen items and a full prompt history of 10
    /// liked items, the usual case; else the first with enough unseen items).
    #[arg(long)]
    pub user: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ServeBenchArgs {
    /// The server's address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
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
pub struct DenormalsBenchArgs {
    /// A collaborative-model run (`collm train cf`), e.g. results/ml-1m/cf-sasrec.
    #[arg(long)]
    pub run: PathBuf,
    /// Its dataset directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Training epochs to time each way per round.
    #[arg(long, default_value_t = 1)]
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
    /// Also time each fused CPU op (forward and backward, and the frozen products inside)
    /// during the timed train steps, and print the train step split by op: where the time
    /// goes, and how much is left outside the ops (candle's adds and copies, the graph, AdamW).
    #[arg(long)]
    pub op_times: bool,
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
                op_times: args.op_times,
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
    if !args.json {
        print!("{}", collm_llm::bench::render(&rows, &args.dtype));
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
    print!("{}", collm_cf::bench::render(&rows, args.epochs));
    Ok(())
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Llm(args) => bench_llm(&args),
        BenchCommand::Cf(args) => bench_cf(&args),
        BenchCommand::Denormals(args) => {
            let ds = collm_data::Dataset::load(&args.data)?;
            let b = collm_cf::bench::measure_denormals(&args.run, &ds, args.epochs)?;
            println!("{}", serde_json::to_string(&b)?);
            println!(
                "{}: {} of {} trained values subnormal; {} epoch(s) from its weights: {:.2} s kept, {:.2} s flushed ({:.2}x); last loss {:.6} / {:.6}\ncpu: {}",
                b.model,
                b.subnormal_params,
                b.params,
                b.epochs,
                b.kept_epoch_seconds,
                b.flushed_epoch_seconds,
                b.speedup,
                b.kept_loss,
                b.flushed_loss,
                collm_core::machine::cpu_description()
            );
            Ok(())
        }
        BenchCommand::Train(a) => {
            let mut config = collm::ExperimentConfig::load(&a.config)?;
            if let Some(m) = &a.mode {
                config.mode = m.parse().map_err(|e| anyhow::anyhow!("--mode: {e}"))?;
            }
            if let Some(d) = &a.data {
                config.data.path = d.clone();
            }
            if let Some(b) = a.batch {
                config.training.batch_size = b;
            }
            config.validate()?;
            let r = collm::bench::bench_train(&collm::bench::TrainBenchOptions {
                config,
                steps: a.steps,
                warm: a.warm,
                eval_rows: a.eval_rows,
                op_times: a.op_times,
            })?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", r.render());
            }
            Ok(())
        }
        BenchCommand::Rank(a) => {
            let rec = collm::recommend::Recommender::open(&a.run, a.data.as_deref())?;
            let r = collm::bench::bench_rank(&rec, a.user, a.candidates, a.seed)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "user {}, {} candidates: whole prompts {:.2} s, shared prefix {:.2} s, speedup {:.2}x, max |diff| {:.2e}",
                    r.user, r.candidates, r.full_s, r.prefix_s, r.speedup, r.max_abs_diff
                );
            }
            Ok(())
        }
        BenchCommand::Serve(a) => {
            let r = collm_serve::client::run_load(&a.addr, a.requests, a.concurrency, a.seed)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} requests, {} clients: {:.1} s, {:.0} req/s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, statuses {:?}",
                    r.requests, r.concurrency, r.seconds, r.requests_per_s, r.p50_ms, r.p99_ms, r.max_ms, r.statuses
                );
            }
            Ok(())
        }
        BenchCommand::AmazonPrepare(args) => {
            let r = collm_data::bench::amazon_prepare(args.lines, &args.dir, args.seed)?;
            print!("{}", r.render());
            Ok(())
        }
    }
}
