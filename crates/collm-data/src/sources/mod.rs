//! Raw sources. Each turns its input files into [`PreparedData`](crate::dataset::PreparedData),
//! which [`write_dataset`](crate::dataset::write_dataset) stores as a dataset directory.

pub mod amazon;
pub mod collm_tsv;
pub mod ml1m;
pub mod synthetic;

use crate::dataset::{write_dataset_into, PreparedData, MANIFEST_FILE};
use crate::Dataset;
use anyhow::Result;
use chrono::{DateTime, Datelike};
use collm_core::io::AtomicDir;
use std::path::{Path, PathBuf};

/// A raw source and its options: what `collm data prepare SOURCE` and `collm.prepare` read.
#[derive(Debug, Clone)]
pub enum Source {
    /// The MovieLens-1M directory (`ratings.dat`, `movies.dat`).
    Ml1m { raw: PathBuf },
    /// Amazon reviews and metadata files (JSON lines, gzip or not).
    AmazonBook {
        reviews: PathBuf,
        meta: PathBuf,
        options: amazon::AmazonOptions,
    },
    /// The reference code's TSV split (`train_ood2.pkl`-derived TSVs and titles).
    CollmTsv {
        input: PathBuf,
        name: Option<String>,
        item_noun: String,
    },
    /// Generated data with a known structure.
    Synthetic(synthetic::SyntheticOptions),
}

/// Prepares `source` into the dataset directory `out` (refused when it holds a dataset,
/// unless `force`): the output is locked and checked before the (long) read of the sources,
/// and written atomically.
pub fn prepare(source: &Source, out: &Path, force: bool) -> Result<Dataset> {
    let dir = AtomicDir::create(out, force, MANIFEST_FILE)?;
    let data: PreparedData = match source {
        Source::Ml1m { raw } => ml1m::prepare(raw)?,
        Source::AmazonBook {
            reviews,
            meta,
            options,
        } => amazon::prepare(reviews, meta, options)?,
        Source::CollmTsv {
            input,
            name,
            item_noun,
        } => collm_tsv::prepare(input, name.as_deref(), item_noun)?,
        Source::Synthetic(o) => synthetic::prepare(o)?,
    };
    let ds = write_dataset_into(data, dir, out)?;
    let m = &ds.manifest;
    let counts: Vec<String> = m
        .splits
        .iter()
        .map(|(k, v)| format!("{k} {}", v.rows))
        .collect();
    tracing::info!(
        "wrote {} ({}; {} users, {} items incl. padding)",
        out.display(),
        counts.join(", "),
        m.num_users,
        m.num_items
    );
    Ok(ds)
}

/// The UTC calendar month of a Unix timestamp as `year * 12 + (month - 1)`.
pub fn utc_month_index(ts: i64) -> Option<i64> {
    let t = DateTime::from_timestamp(ts, 0)?;
    Some(t.year() as i64 * 12 + t.month0() as i64)
}

/// `month_index(2001, 6)` = the index [`utc_month_index`] gives for June 2001.
pub const fn month_index(year: i64, month: i64) -> i64 {
    year * 12 + month - 1
}
