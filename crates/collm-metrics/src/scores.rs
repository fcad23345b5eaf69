//! Scores files: `uid iid score` (header line, tab-separated), one line per row of a split, in
//! the split's order. Both `collm eval scores` and outside tools use this format; `collm
//! score`'s output (`uid iid score prob`, the same with P(Yes) added) is read too.

use anyhow::{bail, Result};
use collm_core::io::LineReader;
use collm_data::Interaction;
use std::fmt::Write as _;
use std::path::Path;

pub const SCORES_HEADER: &str = "uid\tiid\tscore";
/// `collm score`'s output header: the scores file's columns and P(Yes).
pub const SCORES_PROB_HEADER: &str = "uid\tiid\tscore\tprob";

/// Reads a scores file and checks it line by line against the split's rows.
pub fn read_scores(path: &Path, rows: &[Interaction]) -> Result<Vec<f64>> {
    let mut r = LineReader::open(path)?;
    let mut buf = Vec::new();
    let fields = match r.next_str(&mut buf)? {
        None => bail!(
            "{}: empty file: expected the header line 'uid<TAB>iid<TAB>score'",
            path.display()
        ),
        Some(h) if h.trim_end() == SCORES_HEADER => 3,
        Some(h) if h.trim_end() == SCORES_PROB_HEADER => 4,
        Some(h) => {
            let h = h.to_string();
            return Err(r.error(format!(
                "bad header '{h}': expected 'uid<TAB>iid<TAB>score' (or collm score's 'uid<TAB>iid<TAB>score<TAB>prob')"
            )));
        }
    };
    let mut scores = Vec::with_capacity(rows.len());
    while let Some(line) = r.next_str(&mut buf)? {
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != fields {
            return Err(r.error(format!(
                "expected {fields} tab-separated fields (uid, iid, score{}), found {}",
                if fields == 4 { ", prob" } else { "" },
                f.len()
            )));
        }
        let k = scores.len();
        let Some(row) = rows.get(k) else {
            return Err(r.error(format!(
                "more score lines than the split has rows ({})",
                rows.len()
            )));
        };
        let (uid, iid) = (f[0].parse::<u32>(), f[1].parse::<u32>());
        if uid.as_ref().ok() != Some(&row.uid) || iid.as_ref().ok() != Some(&row.iid) {
            return Err(r.error(format!(
                "uid/iid are {}/{}, but row {} of the split is {}/{}: scores must follow the split's order",
                f[0],
                f[1],
                k + 1,
                row.uid,
                row.iid
            )));
        }
        let s: f64 = f[2].trim().parse().map_err(|_| {
            r.error(format!(
                "field 'score' is '{}': expected a finite number",
                f[2]
            ))
        })?;
        if !s.is_finite() {
            return Err(r.error(format!(
                "field 'score' is '{}': expected a finite number",
                f[2]
            )));
        }
        scores.push(s);
    }
    if scores.len() != rows.len() {
        bail!(
            "{}: {} score lines, but the split has {} rows",
            path.display(),
            scores.len(),
            rows.len()
        );
    }
    Ok(scores)
}

/// Formats scores in the scores-file format.
pub fn format_scores(rows: &[Interaction], scores: &[f64]) -> String {
    let mut s = String::with_capacity(rows.len() * 24);
    s.push_str(SCORES_HEADER);
    s.push('\n');
    for (r, x) in rows.iter().zip(scores) {
        let _ = writeln!(s, "{}\t{}\t{x}", r.uid, r.iid);
    }
    s
}
