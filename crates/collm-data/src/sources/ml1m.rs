//! MovieLens-1M as the CoLLM paper split it (reference-spec §1.1,
//! `dataset/ml-1m/processing_ood.ipynb`).
//!
//! - label = 1 when rating ≥ 4;
//! - UTC months: train 2001-06 … 2002-03, valid 2002-04 … 2002-08, test 2002-09 … 2003-01; all
//!   other rows are dropped; no k-core or cold filtering;
//! - history = the user's earlier positives inside that window, across splits (see
//!   [`crate::history`]); rows with equal timestamps keep their order in `ratings.dat`;
//! - users get ids 1..N in increasing raw MovieLens user id, items in order of first
//!   appearance in the (user, timestamp)-sorted rows — the reference's remapping.

use super::{month_index, utc_month_index};
use crate::dataset::{describe_source_file, PreparedData, SourceInfo};
use crate::history::{build_splits, IdMap, RawRow, SplitTag};
use anyhow::{bail, Result};
use collm_core::io::{clean_field, latin1_to_string, LineReader};
use std::collections::HashMap;
use std::path::Path;

pub const TRAIN_MONTHS: (i64, i64) = (month_index(2001, 6), month_index(2002, 3));
pub const VALID_MONTHS: (i64, i64) = (month_index(2002, 4), month_index(2002, 8));
pub const TEST_MONTHS: (i64, i64) = (month_index(2002, 9), month_index(2003, 1));

pub const RULE: &str = "ML-1M as in CoLLM (reference processing_ood.ipynb): label = rating >= 4; \
UTC months train 2001-06..2002-03, valid 2002-04..2002-08, test 2002-09..2003-01, other rows dropped; \
history = the user's earlier positive items inside the window across all splits, oldest first; \
rows sorted stably by (user, timestamp), equal timestamps in ratings.dat order; \
uids 1..N by raw user id, iids 1..M by first appearance in that order; 0 = padding.";

fn split_of(month: i64) -> Option<SplitTag> {
    let within = |(a, b): (i64, i64)| month >= a && month <= b;
    if within(TRAIN_MONTHS) {
        Some(SplitTag::Train)
    } else if within(VALID_MONTHS) {
        Some(SplitTag::Valid)
    } else if within(TEST_MONTHS) {
        Some(SplitTag::Test)
    } else {
        None
    }
}

/// Reads `movies.dat` (`MovieID::Title::Genres`, Latin-1).
fn read_movies(path: &Path) -> Result<HashMap<u32, String>> {
    let mut r = LineReader::open(path)?;
    let mut buf = Vec::new();
    let mut titles = HashMap::new();
    while let Some(bytes) = r.next_bytes(&mut buf)? {
        if bytes.is_empty() {
            continue;
        }
        let line = latin1_to_string(bytes);
        let f: Vec<&str> = line.split("::").collect();
        if f.len() != 3 {
            return Err(r.error(format!(
                "expected 3 fields separated by '::' (MovieID::Title::Genres), found {}",
                f.len()
            )));
        }
        let id: u32 = f[0].trim().parse().map_err(|_| {
            r.error(format!(
                "field MovieID is '{}': expected a positive integer",
                f[0]
            ))
        })?;
        let title = clean_field(f[1]);
        if title.is_empty() {
            return Err(r.error(format!("movie {id} has an empty title")));
        }
        if titles.insert(id, title).is_some() {
            return Err(r.error(format!("movie {id} is listed twice")));
        }
    }
    r.ensure_complete("movies.dat")?;
    if titles.is_empty() {
        bail!(
            "{}: empty file: expected lines MovieID::Title::Genres",
            path.display()
        );
    }
    Ok(titles)
}

struct Rating {
    user: u32,
    movie: u32,
    label: u8,
    timestamp: i64,
    split: SplitTag,
}

/// Reads `ratings.dat` (`UserID::MovieID::Rating::Timestamp`), keeping the rows in the window.
fn read_ratings(path: &Path, titles: &HashMap<u32, String>) -> Result<(Vec<Rating>, usize)> {
    let mut r = LineReader::open_with_progress(path)?;
    let mut buf = Vec::new();
    let mut rows = Vec::new();
    let mut total = 0usize;
    while let Some(line) = r.next_str(&mut buf)? {
        if line.is_empty() {
            continue;
        }
        total += 1;
        let f: Vec<&str> = line.split("::").collect();
        if f.len() != 4 {
            let e = format!(
                "expected 4 fields separated by '::' (UserID::MovieID::Rating::Timestamp), found {}",
                f.len()
            );
            return Err(r.error(e));
        }
        let int = |k: usize, name: &str| -> Result<i64> {
            f[k].trim()
                .parse::<i64>()
                .map_err(|_| r.error(format!("field {name} is '{}': expected an integer", f[k])))
        };
        let user = int(0, "UserID")?;
        let movie = int(1, "MovieID")?;
        let rating = int(2, "Rating")?;
        let timestamp = int(3, "Timestamp")?;
        if user <= 0 || user > u32::MAX as i64 || movie <= 0 || movie > u32::MAX as i64 {
            return Err(r.error("UserID and MovieID must be positive 32-bit integers"));
        }
        if !(1..=5).contains(&rating) {
            return Err(r.error(format!("field Rating is {rating}: expected 1..5")));
        }
        let movie = movie as u32;
        if !titles.contains_key(&movie) {
            return Err(r.error(format!(
                "movie {movie} has no entry (and so no title) in movies.dat"
            )));
        }
        let Some(month) = utc_month_index(timestamp) else {
            return Err(r.error(format!("field Timestamp {timestamp} is out of range")));
        };
        if let Some(split) = split_of(month) {
            rows.push(Rating {
                user: user as u32,
                movie,
                label: u8::from(rating >= 4),
                timestamp,
                split,
            });
        }
    }
    r.ensure_complete("ratings.dat")?;
    if total == 0 {
        bail!(
            "{}: empty file: expected lines UserID::MovieID::Rating::Timestamp",
            path.display()
        );
    }
    Ok((rows, total))
}

/// Prepares ML-1M from the directory holding the original `ratings.dat` and `movies.dat`
/// (`users.dat` is recorded in the manifest when present but not used, as in the reference).
pub fn prepare(raw_dir: &Path) -> Result<PreparedData> {
    let ratings_path = raw_dir.join("ratings.dat");
    let movies_path = raw_dir.join("movies.dat");
    for p in [&ratings_path, &movies_path] {
        if !p.is_file() {
            bail!(
                "{}: not found (expected the original MovieLens-1M files ratings.dat and movies.dat in {})",
                p.display(),
                raw_dir.display()
            );
        }
    }
    let movie_titles = read_movies(&movies_path)?;
    let (mut ratings, total) = read_ratings(&ratings_path, &movie_titles)?;
    // Stable: equal (user, timestamp) keep ratings.dat order.
    ratings.sort_by_key(|r| (r.user, r.timestamp));
    let mut users = IdMap::new();
    let mut items = IdMap::new();
    let raw_rows: Vec<RawRow> = ratings
        .iter()
        .map(|r| RawRow {
            uid: users.id(r.user),
            iid: items.id(r.movie),
            label: r.label,
            timestamp: r.timestamp,
            split: r.split,
        })
        .collect();
    let mut titles = vec![String::new(); items.len() + 1];
    for (movie, iid) in items.into_sorted() {
        titles[iid as usize] = movie_titles[&movie].clone();
    }
    let mut files = vec![
        describe_source_file(&ratings_path)?,
        describe_source_file(&movies_path)?,
    ];
    let users_path = raw_dir.join("users.dat");
    if users_path.is_file() {
        files.push(describe_source_file(&users_path)?);
    }
    let mut params = std::collections::BTreeMap::new();
    params.insert("ratings_read".into(), total.into());
    params.insert("rows_in_window".into(), raw_rows.len().into());
    Ok(PreparedData {
        name: "ml-1m".into(),
        item_noun: "movie".into(),
        source: SourceInfo {
            kind: "ml-1m".into(),
            files,
            params,
        },
        rule: RULE.into(),
        splits: build_splits(raw_rows, true),
        titles,
    })
}
