//! Amazon-Book (Amazon review data 2018, Books 5-core) as the CoLLM paper split it
//! (reference-spec §1.2, `dataset/amazon_book/processing_ood.ipynb`).
//!
//! - reviews whose `asin` has no metadata title are dropped (the reference right-merges the
//!   ratings with the metadata and drops rows with missing values); with several metadata
//!   records for one asin the last wins;
//! - only reviews from the chosen year (2017, UTC) are kept;
//! - one pass (not iterated): keep users and items with **more than** 20 rows in that year,
//!   both counted before either filter is applied (the reference's `> 20`);
//! - label = 1 when `overall` ≥ 5;
//! - ids 1..N in order of first appearance in the review file (after filtering);
//! - train = January–November; December rows are sorted by time (stable: ties keep file
//!   order) and halved: the first ⌊n/2⌋ are valid, the rest test;
//! - history as for every source ([`crate::history`]).
//!
//! The review file (about 10 GB uncompressed for the real data) is streamed, plain or gzip:
//! memory grows with the number of reviews in the chosen year, not with the file.

use super::utc_month_index;
use crate::dataset::{describe_source_file, PreparedData, SourceInfo};
use crate::history::{build_splits, IdMap, RawRow, SplitTag};
use anyhow::{bail, Result};
use collm_core::io::{clean_field, LineReader};
use serde::Deserialize;
use std::borrow::Cow;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct AmazonOptions {
    pub year: i64,
    /// Users and items are kept when they have more than this many rows in `year`.
    pub activity_threshold: usize,
}

impl Default for AmazonOptions {
    fn default() -> Self {
        Self {
            year: 2017,
            activity_threshold: 20,
        }
    }
}

#[derive(Deserialize)]
struct Review<'a> {
    #[serde(rename = "reviewerID", borrow)]
    reviewer: Cow<'a, str>,
    #[serde(borrow)]
    asin: Cow<'a, str>,
    overall: f64,
    #[serde(rename = "unixReviewTime")]
    time: i64,
}

#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(borrow)]
    asin: Cow<'a, str>,
    #[serde(default, borrow)]
    title: Option<Cow<'a, str>>,
}

struct YearRow {
    user: u32,
    item: u32,
    rating: u8,
    timestamp: i64,
    month: u8,
}

fn json_error(r: &LineReader, e: serde_json::Error, expected: &str) -> anyhow::Error {
    r.error(format!("{e}: expected a JSON object with {expected}"))
}

pub fn prepare(reviews: &Path, meta: &Path, opts: &AmazonOptions) -> Result<PreparedData> {
    // Pass 1: the year's reviews, with provisional ids in file order.
    let mut users: IdMap<String> = IdMap::new();
    let mut items: IdMap<String> = IdMap::new();
    let mut rows: Vec<YearRow> = Vec::new();
    let mut total = 0usize;
    let mut r = LineReader::open_with_progress(reviews)?;
    let mut buf = Vec::new();
    while let Some(line) = r.next_str(&mut buf)? {
        if line.trim().is_empty() {
            continue;
        }
        total += 1;
        let rev: Review = serde_json::from_str(line).map_err(|e| {
            json_error(
                &r,
                e,
                "string fields reviewerID and asin, number fields overall and unixReviewTime",
            )
        })?;
        if !(1.0..=5.0).contains(&rev.overall) {
            return Err(r.error(format!("field overall is {}: expected 1..5", rev.overall)));
        }
        let Some(month) = utc_month_index(rev.time) else {
            return Err(r.error(format!("field unixReviewTime {} is out of range", rev.time)));
        };
        if month.div_euclid(12) != opts.year {
            continue;
        }
        rows.push(YearRow {
            user: users.id(rev.reviewer.into_owned()),
            item: items.id(rev.asin.into_owned()),
            rating: rev.overall.round() as u8,
            timestamp: rev.time,
            month: (month.rem_euclid(12) + 1) as u8,
        });
    }
    if total == 0 {
        bail!(
            "{}: empty file: expected one JSON review per line",
            reviews.display()
        );
    }
    let users_in_year = users.len();

    // Pass 2: titles for the items seen in that year (last metadata record wins).
    let mut titles: Vec<Option<String>> = vec![None; items.len() + 1];
    let mut meta_lines = 0usize;
    let mut m = LineReader::open_with_progress(meta)?;
    let mut buf = Vec::new();
    while let Some(line) = m.next_str(&mut buf)? {
        if line.trim().is_empty() {
            continue;
        }
        meta_lines += 1;
        let rec: Meta = serde_json::from_str(line)
            .map_err(|e| json_error(&m, e, "a string field asin and an optional title"))?;
        if let Some(id) = items.get(&rec.asin.to_string()) {
            titles[id as usize] = rec.title.map(|t| clean_field(&t)).filter(|t| !t.is_empty());
        }
    }
    if meta_lines == 0 {
        bail!(
            "{}: empty file: expected one JSON metadata record per line",
            meta.display()
        );
    }

    // Drop rows without a title, then the single-pass activity filter.
    let rows_in_year = rows.len();
    rows.retain(|r| titles[r.item as usize].is_some());
    let rows_with_title = rows.len();
    let mut user_count = vec![0usize; users.len() + 1];
    let mut item_count = vec![0usize; items.len() + 1];
    for r in &rows {
        user_count[r.user as usize] += 1;
        item_count[r.item as usize] += 1;
    }
    let t = opts.activity_threshold;
    rows.retain(|r| user_count[r.user as usize] > t && item_count[r.item as usize] > t);

    // Final ids in order of appearance in the filtered rows.
    let mut final_users = IdMap::new();
    let mut final_items = IdMap::new();
    let mut raw: Vec<RawRow> = rows
        .iter()
        .map(|r| RawRow {
            uid: final_users.id(r.user),
            iid: final_items.id(r.item),
            label: u8::from(r.rating >= 5),
            timestamp: r.timestamp,
            split: SplitTag::Train,
        })
        .collect();
    let mut december: Vec<usize> = (0..rows.len()).filter(|&k| rows[k].month == 12).collect();
    december.sort_by_key(|&k| rows[k].timestamp);
    let half = december.len() / 2;
    for (pos, &k) in december.iter().enumerate() {
        raw[k].split = if pos < half {
            SplitTag::Valid
        } else {
            SplitTag::Test
        };
    }
    let mut out_titles = vec![String::new(); final_items.len() + 1];
    for (tmp, id) in final_items.into_sorted() {
        out_titles[id as usize] = titles[tmp as usize].clone().unwrap_or_default();
    }
    let mut params = std::collections::BTreeMap::new();
    params.insert("year".into(), opts.year.into());
    params.insert("activity_threshold".into(), opts.activity_threshold.into());
    params.insert("review_lines".into(), total.into());
    params.insert("metadata_lines".into(), meta_lines.into());
    params.insert("rows_in_year".into(), rows_in_year.into());
    params.insert("users_in_year".into(), users_in_year.into());
    params.insert("rows_with_title".into(), rows_with_title.into());
    params.insert("rows_kept".into(), raw.len().into());
    let rule = format!(
        "Amazon-Book as in CoLLM (reference processing_ood.ipynb): reviews without a metadata title dropped; \
year {} (UTC) only; single pass keeping users and items with more than {} rows in that year; \
label = overall >= 5; ids 1..N by first appearance in the review file; train = Jan..Nov; December sorted \
stably by time and halved: first floor(n/2) valid, rest test; history = the user's earlier positive items \
across all splits, oldest first, equal timestamps in file order; 0 = padding.",
        opts.year, opts.activity_threshold
    );
    Ok(PreparedData {
        name: "amazon-book".into(),
        item_noun: "book".into(),
        source: SourceInfo {
            kind: "amazon-book".into(),
            files: vec![describe_source_file(reviews)?, describe_source_file(meta)?],
            params,
        },
        rule,
        splits: build_splits(raw, true),
        titles: out_titles,
    })
}
