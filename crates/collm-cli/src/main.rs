//! `collm`: CoLLM — collaborative embeddings in LLMs for recommendation — from raw dataset
//! files to the paper's tables. The binary only parses arguments and calls the libraries; each
//! subcommand group lives in its own file.

mod bench;
mod compact;
mod data;
mod eval;
mod llm;
mod quickstart;
mod recommend;
mod report;
mod train;

use anyhow::Result;

// mimalloc, freed memory kept (see collm::alloc).
#[global_allocator]
static GLOBAL: collm::alloc::Allocator = collm::alloc::Allocator;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "collm",
    version = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("COLLM_BUILD"), ")"),
    about = "CoLLM: LLM recommenders with collaborative embeddings",
    long_about = "CoLLM: LLM recommenders with collaborative embeddings.\n\n\
The pipeline (paper, Figure 2): data -> prompt construction -> hybrid encoding (CIE) -> LLM \
prediction -> metrics. Start with `collm quickstart`, or prepare a dataset with \
`collm data prepare` and evaluate scores with `collm eval scores`.\n\n\
Logging goes to stderr; set COLLM_LOG (e.g. COLLM_LOG=debug) to change its level."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare datasets and inspect them.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train models: collaborative (cf), CoLLM (collm), CTRL (ctrl), grid searches (cf-sweep,
    /// ctrl-sweep). SIGTERM, SIGINT (ctrl-c) or SIGHUP stops a training at its next step with a
    /// checkpoint of where it stood (exit status 128 + the signal; --resume goes on); a second
    /// one ends it at once.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Evaluate scores or models with AUC / UAUC, overall and on warm/cold subsets.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Manual checks of an LLM backbone.
    #[command(subcommand)]
    Llm(llm::LlmCommand),
    /// A Table-2-style markdown table of runs (AUC, UAUC, warm/cold, relative improvement).
    Report(report::ReportArgs),
    /// Benchmarks (throughput, memory), each against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Score `uid iid` pairs with a trained run (CoLLM or collaborative model); rows of one
    /// user share their prompt prefix.
    Score(recommend::ScoreArgs),
    /// Top-K ranking with a trained run: evaluate HR@K / NDCG@K / MRR on a split against
    /// sampled negatives (--split), or recommend for one user (--user).
    Rank(recommend::RankArgs),
    /// Serve a trained run over HTTP: POST /v1/score, POST /v1/rank, GET /health, GET /metrics
    /// (Prometheus), GET /openapi.json. Requests are batched by one model worker; SIGTERM or
    /// ctrl-c drains requests in flight and exits 0.
    Serve(recommend::ServeArgs),
    /// Store finished runs' best weights in half precision (f16 or bf16): half the bytes, each
    /// weight rounded once; evaluate them again afterwards.
    Compact(compact::CompactArgs),
    /// The main job: on a synthetic dataset, train MF, step 1 (TALLRec) and step 2 (CoLLM-MF) on
    /// SmolLM2-135M and compare them on the test split, overall and warm/cold (~10 min, 2 cores).
    Quickstart(quickstart::QuickstartArgs),
}

/// Output piped into a reader that stops early (`collm data stats D --json | head -c 20`): the
/// standard library's `println!` panics on the closed pipe; that is a normal end of the
/// command, not a crash, so it exits quietly with status 0. Every other panic is reported as
/// before.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

fn main() {
    collm::alloc::keep_freed_memory();
    quiet_broken_pipe();
    let filter = tracing_subscriber::EnvFilter::try_from_env("COLLM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    cap_threads();
    // Subnormal floats flushed to zero on every compute thread (collm_core::denormals).
    match collm_core::denormals::from_env() {
        Ok(flush) => collm_core::denormals::set(flush),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
    let result = run(Cli::parse());
    if let Some(n) = thread_count() {
        tracing::debug!("threads at exit: {n}");
    }
    if let Err(e) = result {
        let interrupted = e
            .chain()
            .any(|c| c.is::<collm_core::progress::Interrupted>());
        match collm_core::progress::interrupting_signal() {
            Some(sig) if interrupted => {
                eprintln!(
                    "stopped by signal {sig}: {}",
                    clip_lines(&format!("{e:#}"), 300)
                );
                std::process::exit(128 + sig);
            }
            _ => {
                eprintln!("error: {}", clip_lines(&format!("{e:#}"), 300));
                std::process::exit(1);
            }
        }
    }
}

/// Each line of an error cut to its first `max` characters: messages quote the input they
/// refuse (a TOML line, an id field), which may be megabytes long.
fn clip_lines(msg: &str, max: usize) -> String {
    msg.lines()
        .map(|l| match l.char_indices().nth(max) {
            Some((at, _)) => format!(
                "{}… ({} more characters)",
                &l[..at],
                l[at..].chars().count()
            ),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The compute pools have at most one thread per CPU this process may use: more only contend
/// (`RAYON_NUM_THREADS=1000` made two rows take minutes instead of seconds). A larger request
/// is capped, with a warning; a smaller one is kept. Three pools read the variables: rayon's
/// global pool (the fused ops, gemm), and candle's own rayon pool and barrier pool (its CPU ops),
/// which candle sizes from `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS` when it first uses them;
/// so the variables themselves are set to the cap here, before any thread exists.
fn cap_threads() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let asked = |var: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    let cap = |var: &str| match asked(var) {
        Some(n) if n > cpus => {
            tracing::warn!("{var}={n} is more than the {cpus} CPUs here: using {cpus}");
            cpus
        }
        Some(n) => n,
        None => cpus,
    };
    let threads = cap("RAYON_NUM_THREADS");
    let candle = if asked("CANDLE_NUM_THREADS").is_some() {
        cap("CANDLE_NUM_THREADS")
    } else {
        threads
    };
    // Still one thread here: nothing reads the environment concurrently.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", candle.to_string());
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
    {
        tracing::debug!("thread pool: {e}");
    }
}

/// The process's threads now (Linux; `None` elsewhere): logged at the end of a command (debug).
fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data(cmd) => data::run(cmd),
        Command::Eval(cmd) => eval::run(cmd),
        // SIGTERM, SIGINT or SIGHUP stops a training at its next step with a checkpoint of
        // where it stood (a second one ends the process at once).
        Command::Train(cmd) => {
            let _stop = collm_core::progress::StopOnSignals::install()?;
            train::run(cmd)
        }
        Command::Quickstart(args) => {
            let _stop = collm_core::progress::StopOnSignals::install()?;
            quickstart::run(args)
        }
        Command::Bench(cmd) => bench::run(cmd),
        Command::Llm(cmd) => llm::run(cmd),
        Command::Report(args) => report::run(args),
        Command::Compact(args) => compact::run(args),
        Command::Score(args) => recommend::score(args),
        Command::Rank(args) => recommend::rank(args),
        Command::Serve(args) => recommend::serve(args),
    }
}
