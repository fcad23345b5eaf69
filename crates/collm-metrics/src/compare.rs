//! Is one set of scores above another on the same rows, beyond noise? `collm eval compare`
//! answers with the paired bootstrap over users: each resample draws the split's users with
//! replacement, keeps every row of each drawn user (as often as the user was drawn), and
//! measures both score sets on that same draw. The differences over the resamples give a
//! percentile confidence interval and the fraction of draws in which A is not above B (a
//! one-sided bootstrap p-value).
//!
//! Users, not rows, are the unit: UAUC is a mean over users, and a user's rows share their
//! history and their taste, so rows are not independent draws. A resample is evaluated with
//! integer row weights (the drawn user's multiplicity) over each score set's rows sorted once:
//! the weighted Mann–Whitney count equals the AUC of the explicitly repeated rows exactly
//! (tested), so a resample costs one pass over the rows instead of a sort.

use crate::auc;
use anyhow::{bail, Result};
use collm_data::subsets::{Subset, TrainCounts};
use collm_data::Interaction;
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::HashMap;

/// The row sets compared besides all rows: the paper's warm and cold subsets.
pub const COMPARED_SUBSETS: [Subset; 2] = [Subset::Warm, Subset::Cold];

/// The confidence level of the intervals.
pub const LEVEL: f64 = 0.95;

/// One metric on one set of rows: A, B, their difference and its bootstrap distribution.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Difference {
    /// `all`, or a subset's name (`warm`, `cold`).
    pub rows: String,
    /// `auc` or `uauc`.
    pub metric: String,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// A − B on the split as it is.
    pub diff: Option<f64>,
    /// The percentile interval of A − B over the resamples (level [`LEVEL`]).
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    /// The standard deviation of A − B over the resamples.
    pub se: Option<f64>,
    /// The fraction of resamples in which A − B ≤ 0.
    pub p_not_above: Option<f64>,
    /// Resamples in which the metric was defined for both (both labels, an eligible user).
    pub resamples_defined: usize,
}

/// The paired comparison of two score sets on one split.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Comparison {
    pub resamples: usize,
    pub seed: u64,
    pub level: f64,
    /// Rows of the split.
    pub n: usize,
    /// Distinct users of the split: the units drawn.
    pub users: usize,
    pub differences: Vec<Difference>,
}

/// One score set on one set of rows, ready to be measured under any user weights: the rows
/// sorted by score with their tie groups, and the per-user AUCs of the users that count for
/// UAUC (≥ 2 rows in the set and both labels).
struct Prepared {
    /// Row order by score: each row's user index and label.
    users: Vec<u32>,
    labels: Vec<u8>,
    /// End (exclusive) of each group of equal scores in that order.
    group_end: Vec<usize>,
    /// (user index, that user's AUC) for the users that count for UAUC.
    user_auc: Vec<(u32, f64)>,
}

impl Prepared {
    fn new(idx: &[usize], user_of: &[u32], labels: &[u8], scores: &[f64]) -> Self {
        let mut order = idx.to_vec();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let mut group_end = Vec::new();
        for k in 1..=order.len() {
            if k == order.len() || scores[order[k]] != scores[order[k - 1]] {
                group_end.push(k);
            }
        }
        let mut per_user: HashMap<u32, Vec<usize>> = HashMap::new();
        for &k in idx {
            per_user.entry(user_of[k]).or_default().push(k);
        }
        let mut user_auc: Vec<(u32, f64)> = per_user
            .into_iter()
            .filter(|(_, rows)| rows.len() >= 2)
            .filter_map(|(u, rows)| {
                let l: Vec<u8> = rows.iter().map(|&k| labels[k]).collect();
                let s: Vec<f64> = rows.iter().map(|&k| scores[k]).collect();
                auc(&l, &s).map(|a| (u, a))
            })
            .collect();
        user_auc.sort_by_key(|&(u, _)| u);
        Self {
            users: order.iter().map(|&k| user_of[k]).collect(),
            labels: order.iter().map(|&k| labels[k]).collect(),
            group_end,
            user_auc,
        }
    }

    /// AUC with each row counted `w[its user]` times: twice the weighted Mann–Whitney U, exact
    /// in integers, as [`auc`] computes it on the repeated rows.
    fn auc(&self, w: &[u32]) -> Option<f64> {
        let mut start = 0;
        crate::auc_of_tie_groups(self.group_end.iter().map(|&end| {
            let (mut p, mut q) = (0u64, 0u64);
            for k in start..end {
                let wt = w[self.users[k] as usize] as u64;
                if self.labels[k] != 0 {
                    p += wt;
                } else {
                    q += wt;
                }
            }
            start = end;
            (p, q)
        }))
    }

    /// UAUC with each user counted `w[user]` times: the per-user AUCs do not change under a
    /// resample, only how often each user is in the mean.
    fn uauc(&self, w: &[u32]) -> Option<f64> {
        let (mut sum, mut count) = (0.0f64, 0u64);
        for &(u, a) in &self.user_auc {
            let wt = w[u as usize];
            sum += wt as f64 * a;
            count += wt as u64;
        }
        (count > 0).then(|| sum / count as f64)
    }
}

/// The `q` quantile of sorted values, linearly interpolated (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Compares score set `a` with `b` (one score per row of `rows`, in order) by the paired
/// bootstrap over users: AUC and UAUC on all rows and on [`COMPARED_SUBSETS`].
pub fn compare(
    counts: &TrainCounts,
    rows: &[Interaction],
    a: &[f64],
    b: &[f64],
    resamples: usize,
    seed: u64,
) -> Result<Comparison> {
    for (name, s) in [("A", a), ("B", b)] {
        if s.len() != rows.len() {
            bail!("{} scores in {name} for {} rows", s.len(), rows.len());
        }
        if let Some(k) = s.iter().position(|x| !x.is_finite()) {
            bail!(
                "score of row {} in {name} is {}: scores must be finite",
                k + 1,
                s[k]
            );
        }
    }
    if resamples < 2 {
        bail!("--resamples is {resamples}: at least 2 are needed for an interval");
    }
    // Dense user indices, in order of first appearance.
    let mut index: HashMap<u32, u32> = HashMap::new();
    let user_of: Vec<u32> = rows
        .iter()
        .map(|r| {
            let next = index.len() as u32;
            *index.entry(r.uid).or_insert(next)
        })
        .collect();
    let users = index.len();
    let labels: Vec<u8> = rows.iter().map(|r| r.label).collect();

    let mut sets: Vec<(String, Vec<usize>)> = vec![("all".into(), (0..rows.len()).collect())];
    for sub in COMPARED_SUBSETS {
        let mask = sub.mask(counts, rows);
        sets.push((
            sub.name().into(),
            (0..rows.len()).filter(|&k| mask[k]).collect(),
        ));
    }
    let prepared: Vec<[Prepared; 2]> = sets
        .iter()
        .map(|(_, idx)| {
            [
                Prepared::new(idx, &user_of, &labels, a),
                Prepared::new(idx, &user_of, &labels, b),
            ]
        })
        .collect();

    // diffs[set][metric]: A − B on each resample where both are defined.
    let mut diffs: Vec<[Vec<f64>; 2]> = vec![[Vec::new(), Vec::new()]; sets.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = vec![0u32; users];
    for _ in 0..resamples {
        w.iter_mut().for_each(|x| *x = 0);
        for _ in 0..users {
            w[rng.gen_range(0..users)] += 1;
        }
        for (p, d) in prepared.iter().zip(diffs.iter_mut()) {
            if let (Some(x), Some(y)) = (p[0].auc(&w), p[1].auc(&w)) {
                d[0].push(x - y);
            }
            if let (Some(x), Some(y)) = (p[0].uauc(&w), p[1].uauc(&w)) {
                d[1].push(x - y);
            }
        }
    }

    let ones = vec![1u32; users];
    let mut differences = Vec::new();
    for ((name, _), (p, d)) in sets.iter().zip(prepared.iter().zip(diffs.iter_mut())) {
        for (m, metric) in ["auc", "uauc"].into_iter().enumerate() {
            let point = |q: &Prepared| if m == 0 { q.auc(&ones) } else { q.uauc(&ones) };
            let (va, vb) = (point(&p[0]), point(&p[1]));
            let ds = &mut d[m];
            ds.sort_by(f64::total_cmp);
            let defined = !ds.is_empty();
            let mean = ds.iter().sum::<f64>() / ds.len().max(1) as f64;
            let se = (ds.len() >= 2).then(|| {
                (ds.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (ds.len() - 1) as f64).sqrt()
            });
            let tail = (1.0 - LEVEL) / 2.0;
            differences.push(Difference {
                rows: name.clone(),
                metric: metric.into(),
                a: va,
                b: vb,
                diff: va.zip(vb).map(|(x, y)| x - y),
                ci_low: defined.then(|| quantile(ds, tail)),
                ci_high: defined.then(|| quantile(ds, 1.0 - tail)),
                se,
                p_not_above: defined
                    .then(|| ds.iter().filter(|&&x| x <= 0.0).count() as f64 / ds.len() as f64),
                resamples_defined: ds.len(),
            });
        }
    }
    Ok(Comparison {
        resamples,
        seed,
        level: LEVEL,
        n: rows.len(),
        users,
        differences,
    })
}

impl Comparison {
    /// A human-readable table; `a` and `b` name the two score sets.
    pub fn render(&self, a: &str, b: &str) -> String {
        let f = crate::fmt_metric;
        let signed = |x: Option<f64>| x.map(|v| format!("{v:+.4}")).unwrap_or_else(|| "-".into());
        let mut s = format!("A: {a}\nB: {b}\n");
        s += &format!(
            "{:<6} {:<5} {:>7} {:>7} {:>8}  {:<20} {:>8}\n",
            "rows",
            "",
            "A",
            "B",
            "A-B",
            format!("{:.0}% interval", self.level * 100.0),
            "P(A<=B)"
        );
        for d in &self.differences {
            let ci = match (d.ci_low, d.ci_high) {
                (Some(l), Some(h)) => format!("[{l:+.4}, {h:+.4}]"),
                _ => "-".into(),
            };
            let p = match d.p_not_above {
                Some(0.0) => format!("<{:.4}", 1.0 / d.resamples_defined as f64),
                Some(p) => format!("{p:.4}"),
                None => "-".into(),
            };
            s += &format!(
                "{:<6} {:<5} {:>7} {:>7} {:>8}  {:<20} {:>8}\n",
                d.rows,
                if d.metric == "auc" { "AUC" } else { "UAUC" },
                f(d.a),
                f(d.b),
                signed(d.diff),
                ci,
                p
            );
        }
        s += &format!(
            "Paired bootstrap over the split's {} users ({} rows): {} resamples (seed {}), each\n\
             drawing {} users with replacement with all their rows, both score sets measured on\n\
             the same draw. P(A<=B): the fraction of draws in which A is not above B.\n",
            self.users, self.n, self.resamples, self.seed, self.users
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uid: u32, iid: u32, label: u8) -> Interaction {
        Interaction {
            uid,
            iid,
            label,
            timestamp: 0,
            history: vec![],
        }
    }

    /// Random rows: `users` users with 1..=`per_user` rows each, labels and two score sets
    /// where `a` carries more signal than `b` when `gap > 0`.
    fn data(
        rng: &mut ChaCha8Rng,
        users: u32,
        per_user: usize,
        gap: f64,
    ) -> (Vec<Interaction>, Vec<f64>, Vec<f64>) {
        let (mut rows, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
        for u in 1..=users {
            let bias: f64 = rng.gen_range(-1.0..1.0);
            for _ in 0..rng.gen_range(1..=per_user) {
                let label = rng.gen_range(0..2u8);
                let y = label as f64;
                let iid = rng.gen_range(1..40);
                rows.push(row(u, iid, label));
                // Rounded to few levels: many ties.
                let noise =
                    |rng: &mut ChaCha8Rng| (rng.gen_range(-2.0..2.0f64) * 4.0).round() / 4.0;
                a.push(bias + (0.5 + gap) * y + noise(rng));
                b.push(bias + 0.5 * y + noise(rng));
            }
        }
        (rows, a, b)
    }

    #[test]
    fn weighted_auc_and_uauc_equal_the_metrics_of_the_repeated_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..30 {
            let (rows, a, _) = data(&mut rng, 25, 6, 0.0);
            let mut index = HashMap::new();
            let user_of: Vec<u32> = rows
                .iter()
                .map(|r| {
                    let n = index.len() as u32;
                    *index.entry(r.uid).or_insert(n)
                })
                .collect();
            let labels: Vec<u8> = rows.iter().map(|r| r.label).collect();
            let idx: Vec<usize> = (0..rows.len()).collect();
            let p = Prepared::new(&idx, &user_of, &labels, &a);
            let w: Vec<u32> = (0..index.len()).map(|_| rng.gen_range(0..4)).collect();
            // The composed version: every row of user u written w[u] times, each copy of a
            // user a distinct user for UAUC.
            let (mut uu, mut ll, mut ss) = (Vec::new(), Vec::new(), Vec::new());
            for (u, &wt) in w.iter().enumerate() {
                for copy in 0..wt {
                    for k in (0..rows.len()).filter(|&k| user_of[k] as usize == u) {
                        uu.push(1000 * u as u32 + copy);
                        ll.push(labels[k]);
                        ss.push(a[k]);
                    }
                }
            }
            assert_eq!(p.auc(&w), auc(&ll, &ss), "weighted AUC");
            let (want, _) = crate::uauc(&uu, &ll, &ss);
            match (p.uauc(&w), want) {
                (Some(x), Some(y)) => assert!((x - y).abs() < 1e-12, "{x} vs {y}"),
                (x, y) => assert_eq!(x, y),
            }
        }
    }

    #[test]
    fn point_estimates_are_the_reports_metrics() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (rows, a, b) = data(&mut rng, 60, 8, 0.2);
        let counts = TrainCounts::from_rows(&rows[..rows.len() / 2]);
        let c = compare(&counts, &rows, &a, &b, 50, 1).unwrap();
        let (ra, rb) = (
            crate::Report::compute(&counts, &rows, &a).unwrap(),
            crate::Report::compute(&counts, &rows, &b).unwrap(),
        );
        let get = |rows: &str, metric: &str| {
            c.differences
                .iter()
                .find(|d| d.rows == rows && d.metric == metric)
                .unwrap()
                .clone()
        };
        assert_eq!(get("all", "auc").a, ra.auc);
        assert_eq!(get("all", "auc").b, rb.auc);
        for sub in ["warm", "cold"] {
            assert_eq!(get(sub, "auc").a, ra.subsets[sub].auc);
            let (x, y) = (get(sub, "uauc").a.unwrap(), ra.subsets[sub].uauc.unwrap());
            assert!((x - y).abs() < 1e-12);
        }
        let (x, y) = (get("all", "uauc").b.unwrap(), rb.uauc.unwrap());
        assert!((x - y).abs() < 1e-12);
        assert_eq!(c.differences.len(), 6);
        // The same seed gives the same intervals; another seed other ones.
        assert_eq!(c, compare(&counts, &rows, &a, &b, 50, 1).unwrap());
        assert_ne!(c, compare(&counts, &rows, &a, &b, 50, 2).unwrap());
    }

    #[test]
    fn identical_scores_differ_by_nothing() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (rows, a, _) = data(&mut rng, 40, 5, 0.0);
        let counts = TrainCounts::from_rows(&rows);
        let c = compare(&counts, &rows, &a, &a, 200, 0).unwrap();
        for d in &c.differences {
            assert_eq!(d.diff, Some(0.0));
            assert_eq!(
                (d.ci_low, d.ci_high, d.se),
                (Some(0.0), Some(0.0), Some(0.0))
            );
            assert_eq!(d.p_not_above, Some(1.0));
        }
    }

    #[test]
    fn a_clearly_better_score_set_is_found_and_a_noisy_one_is_not() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let (rows, a, b) = data(&mut rng, 400, 10, 0.8);
        let counts = TrainCounts::from_rows(&rows);
        let c = compare(&counts, &rows, &a, &b, 500, 0).unwrap();
        let all_auc = &c.differences[0];
        assert!(all_auc.ci_low.unwrap() > 0.0, "{all_auc:?}");
        assert_eq!(all_auc.p_not_above, Some(0.0));
        // B against A: the mirror image.
        let r = compare(&counts, &rows, &b, &a, 500, 0).unwrap();
        assert!(r.differences[0].ci_high.unwrap() < 0.0);
        assert_eq!(r.differences[0].p_not_above, Some(1.0));
        // Two score sets of the same quality: the interval holds 0.
        let (rows, a, b) = data(&mut rng, 400, 10, 0.0);
        let c = compare(&counts, &rows, &a, &b, 500, 0).unwrap();
        for d in &c.differences[..2] {
            assert!(d.ci_low.unwrap() < 0.0 && d.ci_high.unwrap() > 0.0, "{d:?}");
        }
    }

    /// DeLong, DeLong & Clarke-Pearson (1988): the variance of the difference of two
    /// correlated AUCs from their structural components.
    fn delong_se(labels: &[u8], a: &[f64], b: &[f64]) -> f64 {
        let psi = |x: f64, y: f64| {
            if x > y {
                1.0
            } else if x == y {
                0.5
            } else {
                0.0
            }
        };
        let pos: Vec<usize> = (0..labels.len()).filter(|&k| labels[k] == 1).collect();
        let neg: Vec<usize> = (0..labels.len()).filter(|&k| labels[k] == 0).collect();
        // Components of the difference: V10 over positives, V01 over negatives.
        let v10: Vec<f64> = pos
            .iter()
            .map(|&i| {
                neg.iter()
                    .map(|&j| psi(a[i], a[j]) - psi(b[i], b[j]))
                    .sum::<f64>()
                    / neg.len() as f64
            })
            .collect();
        let v01: Vec<f64> = neg
            .iter()
            .map(|&j| {
                pos.iter()
                    .map(|&i| psi(a[i], a[j]) - psi(b[i], b[j]))
                    .sum::<f64>()
                    / pos.len() as f64
            })
            .collect();
        let var = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64
        };
        (var(&v10) / pos.len() as f64 + var(&v01) / neg.len() as f64).sqrt()
    }

    #[test]
    fn with_one_row_per_user_the_auc_interval_agrees_with_delong() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (rows, a, b) = data(&mut rng, 800, 1, 0.15);
        let counts = TrainCounts::from_rows(&rows);
        let labels: Vec<u8> = rows.iter().map(|r| r.label).collect();
        let c = compare(&counts, &rows, &a, &b, 4000, 0).unwrap();
        let (boot, delong) = (c.differences[0].se.unwrap(), delong_se(&labels, &a, &b));
        assert!(
            (boot / delong - 1.0).abs() < 0.08,
            "bootstrap {boot} vs DeLong {delong}"
        );
    }

    #[test]
    fn the_uauc_interval_has_the_standard_error_of_a_mean_over_users() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (rows, a, b) = data(&mut rng, 300, 12, 0.1);
        let counts = TrainCounts::from_rows(&rows);
        let c = compare(&counts, &rows, &a, &b, 4000, 0).unwrap();
        // The per-user AUC differences of the eligible users (eligible under A iff under B:
        // the same rows and labels).
        let mut d = Vec::new();
        for u in 1..=300u32 {
            let idx: Vec<usize> = (0..rows.len()).filter(|&k| rows[k].uid == u).collect();
            let l: Vec<u8> = idx.iter().map(|&k| rows[k].label).collect();
            let sa: Vec<f64> = idx.iter().map(|&k| a[k]).collect();
            let sb: Vec<f64> = idx.iter().map(|&k| b[k]).collect();
            if let (true, Some(x), Some(y)) = (idx.len() >= 2, auc(&l, &sa), auc(&l, &sb)) {
                d.push(x - y);
            }
        }
        let m = d.iter().sum::<f64>() / d.len() as f64;
        let sd = (d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / d.len() as f64).sqrt();
        // Users without an eligible row are drawn too, so the mean's denominator varies a
        // little: the ratio of a mean over a random count (delta method) is close to this.
        let want = sd / (d.len() as f64).sqrt();
        let got = c.differences[1].se.unwrap();
        assert!((got / want - 1.0).abs() < 0.08, "bootstrap {got} vs {want}");
        assert!((c.differences[1].diff.unwrap() - m).abs() < 1e-12);
    }

    #[test]
    fn bad_input_is_named() {
        let rows = vec![row(1, 1, 1), row(1, 2, 0)];
        let counts = TrainCounts::from_rows(&rows);
        let e = compare(&counts, &rows, &[0.1], &[0.1, 0.2], 10, 0).unwrap_err();
        assert!(e.to_string().contains("1 scores in A for 2 rows"), "{e}");
        let e = compare(&counts, &rows, &[0.1, 0.2], &[0.1, f64::NAN], 10, 0).unwrap_err();
        assert!(e.to_string().contains("row 2 in B"), "{e}");
        let e = compare(&counts, &rows, &[0.1, 0.2], &[0.1, 0.2], 1, 0).unwrap_err();
        assert!(e.to_string().contains("--resamples"), "{e}");
    }
}
