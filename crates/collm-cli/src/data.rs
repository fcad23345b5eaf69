//! `collm data …`: prepare dataset directories from raw sources, and describe them.

use anyhow::Result;
use clap::{Args, Subcommand};
use collm_data::sources::{amazon, prepare, synthetic, Source};
use collm_data::{stats, Dataset};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Turn a raw source into a dataset directory (train/valid/test TSVs, items.tsv,
    /// dataset.json). Written atomically: nothing partial is left on error.
    #[command(subcommand)]
    Prepare(PrepareSource),
    /// Print the paper's Table 1 columns and more for a dataset directory.
    Stats(StatsArgs),
}

#[derive(Args, Clone)]
pub struct OutArgs {
    /// The dataset directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it already exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Subcommand)]
pub enum PrepareSource {
    /// MovieLens-1M as the CoLLM paper split it: label = rating >= 4; UTC months train
    /// 2001-06..2002-03, valid 2002-04..2002-08, test 2002-09..2003-01.
    #[command(name = "ml-1m")]
    Ml1m {
        /// Directory with the original ratings.dat and movies.dat (users.dat optional).
        #[arg(long)]
        raw: PathBuf,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Amazon 2018 Books (5-core reviews + metadata, JSON lines, plain or .gz) as the CoLLM
    /// paper split it: one year, users/items with more than 20 rows, label = rating >= 5,
    /// December halved into valid and test.
    #[command(name = "amazon-book")]
    AmazonBook {
        /// Reviews file (e.g. Books_5.json.gz): reviewerID, asin, overall, unixReviewTime.
        #[arg(long)]
        reviews: PathBuf,
        /// Metadata file (e.g. meta_Books.json.gz): asin, title.
        #[arg(long)]
        meta: PathBuf,
        /// The year kept (UTC).
        #[arg(long, default_value_t = 2017)]
        year: i64,
        /// Keep users and items with MORE than this many rows in that year.
        #[arg(long, default_value_t = 20)]
        activity_threshold: usize,
        #[command(flatten)]
        out: OutArgs,
    },
    /// A ready split in collm TSV format (train.tsv, valid.tsv, optional test.tsv, items.tsv).
    #[command(name = "collm-tsv")]
    CollmTsv {
        /// Directory holding the TSV files.
        #[arg(long)]
        input: PathBuf,
        /// Dataset name for the manifest (default: the input directory's name).
        #[arg(long)]
        name: Option<String>,
        /// What an item is, as prompts will say it.
        #[arg(long, default_value = "movie")]
        item_noun: String,
        #[command(flatten)]
        out: OutArgs,
    },
    /// A seeded synthetic dataset whose labels mix a semantic signal (genres spelled out in
    /// titles) and a collaborative one (latent factors no text reveals).
    Synthetic {
        #[command(flatten)]
        opts: SyntheticArgs,
        #[command(flatten)]
        out: OutArgs,
    },
}

#[derive(Args, Clone)]
pub struct SyntheticArgs {
    #[arg(long, default_value_t = synthetic::SyntheticOptions::default().users)]
    pub users: usize,
    #[arg(long, default_value_t = synthetic::SyntheticOptions::default().items)]
    pub items: usize,
    /// Mean number of rows per user.
    #[arg(long, default_value_t = synthetic::SyntheticOptions::default().rows_per_user)]
    pub rows_per_user: f64,
    /// Weight of the genres' appeal in the label logit (the title reveals the genre).
    #[arg(long, default_value_t = synthetic::SyntheticOptions::default().semantic_weight)]
    pub semantic_weight: f64,
    /// Weight of each user's personal taste per genre (the liked history reveals it).
    #[arg(long, default_value_t = synthetic::SyntheticOptions::default().taste_weight)]
    pub taste_weight: f64,
    /// Weight of the collaborative (latent factor) part of the label logit.
    #[arg(long, default_value_t = synthetic::SyntheticOptions::default().collaborative_weight)]
    pub collaborative_weight: f64,
    /// Words of each genre's list used in titles (2..=8; fewer = more shared words).
    #[arg(long, default_value_t = synthetic::SyntheticOptions::default().title_words)]
    pub title_words: usize,
    #[arg(long, default_value_t = synthetic::SyntheticOptions::default().seed)]
    pub seed: u64,
}

impl SyntheticArgs {
    pub fn options(&self) -> synthetic::SyntheticOptions {
        synthetic::SyntheticOptions {
            users: self.users,
            items: self.items,
            rows_per_user: self.rows_per_user,
            semantic_weight: self.semantic_weight,
            taste_weight: self.taste_weight,
            collaborative_weight: self.collaborative_weight,
            title_words: self.title_words,
            seed: self.seed,
            ..Default::default()
        }
    }
}

#[derive(Args)]
pub struct StatsArgs {
    /// A dataset directory made by `collm data prepare`.
    pub dir: PathBuf,
    /// Print JSON: splits.<name>.rows, num_users / num_items (padding id 0 included), …
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Prepare(src) => {
            let (source, out) = match src {
                PrepareSource::Ml1m { raw, out } => (Source::Ml1m { raw }, out),
                PrepareSource::AmazonBook {
                    reviews,
                    meta,
                    year,
                    activity_threshold,
                    out,
                } => {
                    let options = amazon::AmazonOptions {
                        year,
                        activity_threshold,
                    };
                    (
                        Source::AmazonBook {
                            reviews,
                            meta,
                            options,
                        },
                        out,
                    )
                }
                PrepareSource::CollmTsv {
                    input,
                    name,
                    item_noun,
                    out,
                } => (
                    Source::CollmTsv {
                        input,
                        name,
                        item_noun,
                    },
                    out,
                ),
                PrepareSource::Synthetic { opts, out } => (Source::Synthetic(opts.options()), out),
            };
            prepare(&source, &out.out, out.force)?;
            Ok(())
        }
        DataCommand::Stats(args) => {
            let ds = Dataset::load(&args.dir)?;
            let st = stats::compute(&ds)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", stats::render(&st));
            }
            Ok(())
        }
    }
}
