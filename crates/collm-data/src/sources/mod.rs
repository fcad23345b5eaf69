//! Raw sources. Each turns its input files into [`PreparedData`](crate::dataset::PreparedData),
//! which [`write_dataset`](crate::dataset::write_dataset) stores as a dataset directory.

pub mod amazon;
pub mod collm_tsv;
pub mod ml1m;
pub mod synthetic;

use chrono::{DateTime, Datelike};

/// The UTC calendar month of a Unix timestamp as `year * 12 + (month - 1)`.
pub fn utc_month_index(ts: i64) -> Option<i64> {
    let t = DateTime::from_timestamp(ts, 0)?;
    Some(t.year() as i64 * 12 + t.month0() as i64)
}

/// `month_index(2001, 6)` = the index [`utc_month_index`] gives for June 2001.
pub const fn month_index(year: i64, month: i64) -> i64 {
    year * 12 + month - 1
}
