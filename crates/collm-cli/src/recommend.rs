//! `collm score`, `collm rank` and `collm serve`: recommending with a trained run of either
//! kind (the library's `collm::recommend` and the `collm-serve` crate do the work).

use anyhow::{bail, Result};
use clap::Args;
use collm::recommend::{score_file, Recommender};
use std::path::PathBuf;

#[derive(Args)]
pub struct ScoreArgs {
    /// Run directory (`collm train collm` or `collm train cf`).
    #[arg(long)]
    pub run: PathBuf,
    /// Dataset directory: needed by a collaborative-model run; for a CoLLM run, checked to be
    /// the one it was trained on.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// `uid iid` pairs, one per line (tab or space; an optional `uid iid` header), any order,
    /// any users. Rows of one user share their prompt prefix. A known user's prompt holds their
    /// latest history: the items they liked in every split, test positives included (what
    /// `collm serve` sees); see --split for a split's own context.
    #[arg(long)]
    pub input: PathBuf,
    /// Score each pair in the context of its own row in this split (the history the user had
    /// then), as `collm eval --split` does: the same scores and AUC. Every pair must be a row
    /// of the split.
    #[arg(long)]
    pub split: Option<String>,
    /// Output TSV `uid iid score prob` in the input's order (score = the logit, prob = P(Yes)),
    /// written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct RankArgs {
    /// Run directory (`collm train collm` or `collm train cf`).
    #[arg(long)]
    pub run: PathBuf,
    /// Dataset directory: needed by a collaborative-model run; for a CoLLM run, checked to be
    /// the one it was trained on.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Evaluate top-K ranking on this split: every positive row against `candidates - 1`
    /// items sampled (seeded) from those its user never interacted with.
    #[arg(long, conflicts_with = "user")]
    pub split: Option<String>,
    /// Candidates per positive, the positive included.
    #[arg(long, default_value_t = 100)]
    pub candidates: usize,
    /// Rank all items this user has not interacted with and print the best `k`.
    #[arg(long)]
    pub user: Option<u64>,
    /// How many items to return (at least 1).
    #[arg(long, default_value_t = 10, value_parser = positive)]
    pub k: usize,
    /// Seed of the negative sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON: {"hr@K","ndcg@K","mrr","users","cases","candidates","mean_candidates","k"}
    /// for --split, the ranked items for --user.
    #[arg(long)]
    pub json: bool,
    /// With --split: write every case's ranked candidates here (TSV `uid positive rank iid
    /// score title`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Run directory (`collm train collm` or `collm train cf`).
    #[arg(long)]
    pub run: PathBuf,
    /// Dataset directory: needed by a collaborative-model run; for a CoLLM run, checked to be
    /// the one it was trained on.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Most scoring rows one model call takes from the queue (requests are batched together).
    #[arg(long, default_value_t = 256, value_parser = positive)]
    pub max_batch: usize,
    /// How long the worker waits for more requests before running a batch (milliseconds).
    #[arg(long, default_value_t = 2)]
    pub max_wait_ms: u64,
    /// Requests waiting for the model at most; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 1024, value_parser = positive)]
    pub queue: usize,
    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = 1 << 20, value_parser = positive)]
    pub max_body: usize,
    /// Most items (or candidates) one request may score; larger requests are answered 413.
    /// Default: 1000 for a CoLLM run (an LLM scores a few dozen rows a second on 2 cores),
    /// 100000 for a collaborative-model run.
    #[arg(long, value_parser = positive)]
    pub max_items: Option<usize>,
}

pub fn score(a: ScoreArgs) -> Result<()> {
    let same = |x: &std::path::Path, y: &std::path::Path| match (x.canonicalize(), y.canonicalize())
    {
        (Ok(x), Ok(y)) => x == y,
        _ => x == y,
    };
    if same(&a.input, &a.out) {
        bail!(
            "--out {} is the --input file: write the scores elsewhere (the input would be replaced)",
            a.out.display()
        );
    }
    let rec = Recommender::open(&a.run, a.data.as_deref())?;
    let n = score_file(&rec, &a.input, &a.out, a.split.as_deref(), !a.quiet)?;
    eprintln!("scored {n} rows -> {}", a.out.display());
    Ok(())
}

pub fn rank(a: RankArgs) -> Result<()> {
    let rec = Recommender::open(&a.run, a.data.as_deref())?;
    match (&a.split, a.user) {
        (Some(split), None) => {
            let (report, lists) =
                rec.evaluate_ranking(split, a.candidates, a.k, a.seed, !a.quiet)?;
            if let Some(out) = &a.out {
                collm_core::io::write_file_atomic(out, lists.as_bytes())?;
            }
            if a.json {
                println!("{}", report.to_json());
            } else {
                println!(
                    "{split}: HR@{k} {:.4}  NDCG@{k} {:.4}  MRR {:.4}  ({} users, {} cases, {} candidates each, {:.1} on average)",
                    report.hr,
                    report.ndcg,
                    report.mrr,
                    report.users,
                    report.cases,
                    report.candidates,
                    report.mean_candidates,
                    k = report.k
                );
            }
        }
        (None, Some(uid)) => {
            if a.out.is_some() {
                bail!("--out goes with --split");
            }
            let user = rec.user(uid)?;
            let top = rec.rank(&user, a.k, None, !a.quiet)?;
            if a.json {
                println!("{}", serde_json::json!({ "user": uid, "items": top }));
            } else {
                println!("rank\titem\tscore\ttitle");
                for (j, r) in top.iter().enumerate() {
                    println!("{}\t{}\t{:.4}\t{}", j + 1, r.item, r.score, r.title);
                }
            }
        }
        _ => bail!("give --split NAME (evaluate ranking) or --user UID (recommend for one user)"),
    }
    Ok(())
}

pub fn serve(a: ServeArgs) -> Result<()> {
    collm_serve::run(&collm_serve::ServeOptions {
        run: a.run,
        data: a.data,
        addr: a.addr,
        max_batch: a.max_batch,
        max_wait: std::time::Duration::from_millis(a.max_wait_ms),
        queue: a.queue,
        max_body: a.max_body,
        max_items: a.max_items,
        header_timeout: None,
    })
}

/// A count that must be at least 1 (`--k`, `--max-batch`, `--queue`, `--max-body`).
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}
