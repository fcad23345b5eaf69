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
///
/// A score that is an f32 widened to f64 (every score collm computes) is written with the
/// shortest digits that read back to that f32, a third fewer bytes than the f64's digits
/// (`0.8230512` for `0.8230512142181396`). Read as f64 ([`read_scores`]) they keep every
/// order and tie of the scores, so AUC, UAUC and `collm eval compare` read the same as from
/// the exact values: the digits lie inside the f32's rounding interval, those intervals are
/// disjoint and ordered, and two such decimals (9 significant digits at most) differ by far
/// more than an f64's spacing. Any other value keeps its own shortest f64 digits.
pub fn format_scores(rows: &[Interaction], scores: &[f64]) -> String {
    let mut s = String::with_capacity(rows.len() * 16);
    s.push_str(SCORES_HEADER);
    s.push('\n');
    for (r, &x) in rows.iter().zip(scores) {
        let _ = write!(s, "{}\t{}\t", r.uid, r.iid);
        push_score(&mut s, x);
        s.push('\n');
    }
    s
}

/// One score as [`format_scores`] writes it.
fn push_score(s: &mut String, x: f64) {
    let y = x as f32;
    if f64::from(y) == x {
        let _ = write!(s, "{y}");
    } else {
        let _ = write!(s, "{x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Vec<Interaction> {
        (0..n)
            .map(|k| Interaction {
                uid: k as u32 % 7,
                iid: k as u32,
                label: (k % 2) as u8,
                timestamp: k as i64,
                history: Vec::new(),
            })
            .collect()
    }

    /// Each pair of rows' order (below, tie, above): what AUC and UAUC read of the scores.
    fn pair_orders(x: &[f64]) -> Vec<std::cmp::Ordering> {
        let mut out = Vec::new();
        for i in 0..x.len() {
            for j in i + 1..x.len() {
                out.push(x[i].partial_cmp(&x[j]).unwrap());
            }
        }
        out
    }

    #[test]
    fn f32_scores_take_their_shortest_digits_and_keep_order_and_ties() {
        // Neighbouring f32s (one spacing apart) around several magnitudes, ties, signs, and
        // a tiny value: the cases where shorter digits could merge or swap two scores.
        let mut v: Vec<f32> = Vec::new();
        for base in [0.8230512f32, 1.1132197, -3.25, 1e-7, 12345.678, 0.0, -0.0] {
            let mut x = base;
            for _ in 0..4 {
                v.push(x);
                v.push(x);
                x = f32::from_bits(if x >= 0.0 {
                    x.to_bits() + 1
                } else {
                    x.to_bits() - 1
                });
            }
        }
        let mut state = 12345u64;
        for _ in 0..300 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = f32::from_bits((state >> 33) as u32 & 0x7f7f_ffff) * 1e-30;
            v.push(if state & 1 == 0 { x } else { -x });
        }
        let scores: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
        let rows = rows(scores.len());
        let text = format_scores(&rows, &scores);
        assert!(text.contains("\t0.8230512\n"), "{}", &text[..200]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tsv");
        std::fs::write(&path, &text).unwrap();
        let back = read_scores(&path, &rows).unwrap();
        for (a, b) in scores.iter().zip(&back) {
            assert_eq!(*a as f32, *b as f32, "{a} read back as {b}");
        }
        assert_eq!(pair_orders(&scores), pair_orders(&back));
        // Fewer bytes than the f64 digits.
        let long: usize = scores.iter().map(|x| format!("{x}").len()).sum();
        let short: usize = scores.iter().map(|x| format!("{}", *x as f32).len()).sum();
        assert!(short < long);
    }

    #[test]
    fn other_f64_scores_keep_their_digits() {
        let scores = [0.1f64, 1.0 / 3.0, f64::from(0.1f32)];
        let text = format_scores(&rows(3), &scores);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "0\t0\t0.1");
        assert_eq!(lines[2], "1\t1\t0.3333333333333333");
        assert_eq!(lines[3], "2\t2\t0.1");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tsv");
        std::fs::write(&path, &text).unwrap();
        let back = read_scores(&path, &rows(3)).unwrap();
        assert_eq!(back[..2], scores[..2]);
    }
}
