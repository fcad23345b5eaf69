//! The last box of CoLLM's pipeline: AUC and UAUC, overall and on warm/cold subsets, exactly as
//! the paper's reference code computes them (reference-spec §5), and the report JSON that every
//! `collm eval …` command prints:
//!
//! ```json
//! {"auc":…, "uauc":…, "n":…, "uauc_users":…,
//!  "subsets": {"warm": {"auc":…, "uauc":…, "n":…, "uauc_users":…}, …}}
//! ```
//! A metric that is undefined (one class only, no eligible user) is `null`.

pub mod compare;
pub mod ranking;
pub mod scores;

use anyhow::{bail, Result};
use collm_data::subsets::{Subset, TrainCounts};
use collm_data::{Dataset, Interaction};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// What trained a run directory, recorded as `"kind"` in its `metrics.json` so that readers
/// (reports, evaluation) need not guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// `collm train cf`: a collaborative model, one curve point per epoch.
    Cf,
    /// `collm train collm`: a CoLLM run (any mode), one curve point per validation step.
    Collm,
}

impl RunKind {
    /// The curve's x axis.
    pub fn x_label(self) -> &'static str {
        match self {
            RunKind::Cf => "epoch",
            RunKind::Collm => "step",
        }
    }

    /// The kind of the run directory `run`, from its `config.toml` (`[cf]` or `[experiment]`):
    /// the one place that tells the two run layouts apart.
    pub fn of_run(run: &std::path::Path) -> Result<RunKind> {
        use anyhow::Context;
        let p = run.join("config.toml");
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "{}: cannot read (is {} a run directory?)",
                p.display(),
                run.display()
            )
        })?;
        let t: toml::Table =
            toml::from_str(&text).with_context(|| format!("{}: not valid TOML", p.display()))?;
        match (t.contains_key("cf"), t.contains_key("experiment")) {
            (true, false) => Ok(RunKind::Cf),
            (false, true) => Ok(RunKind::Collm),
            _ => bail!(
                "{}: neither a collaborative-model run ([cf]) nor a CoLLM run ([experiment])",
                p.display()
            ),
        }
    }
}

/// Area under the ROC curve, identical to scikit-learn's `roc_auc_score`: the probability that
/// a random positive scores above a random negative, ties counting one half. `None` when
/// either class is absent (scikit-learn raises an error there).
///
/// Computed exactly in integers (twice the Mann–Whitney U) and divided once at the end.
pub fn auc(labels: &[u8], scores: &[f64]) -> Option<f64> {
    assert_eq!(
        labels.len(),
        scores.len(),
        "labels and scores differ in length"
    );
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut groups = Vec::new();
    let mut k = 0;
    while k < order.len() {
        let s = scores[order[k]];
        let (mut p, mut q) = (0u64, 0u64);
        while k < order.len() && scores[order[k]] == s {
            if labels[order[k]] != 0 {
                p += 1;
            } else {
                q += 1;
            }
            k += 1;
        }
        groups.push((p, q));
    }
    auc_of_tie_groups(groups)
}

/// AUC from the groups of equal scores in ascending order, each as (positives, negatives) it
/// holds (counts, or integer weights: a row counted w times): twice the Mann–Whitney U, exact in
/// integers, divided once at the end. `None` when either class is absent. What [`auc`] and the
/// paired bootstrap's resamples (`compare`) compute.
pub(crate) fn auc_of_tie_groups(groups: impl IntoIterator<Item = (u64, u64)>) -> Option<f64> {
    let (mut neg_below, mut twice_u) = (0u128, 0u128);
    let (mut pos_total, mut neg_total) = (0u128, 0u128);
    for (p, q) in groups {
        let (p, q) = (p as u128, q as u128);
        twice_u += 2 * p * neg_below + p * q;
        neg_below += q;
        pos_total += p;
        neg_total += q;
    }
    if pos_total == 0 || neg_total == 0 {
        return None;
    }
    Some(twice_u as f64 / (2 * pos_total * neg_total) as f64)
}

/// UAUC as the reference's `uAUC_me`: rows grouped by user; users with a single row or a
/// single class are skipped; the unweighted mean of the per-user AUCs. Returns the mean (None
/// when no user counts) and how many users counted.
pub fn uauc(users: &[u32], labels: &[u8], scores: &[f64]) -> (Option<f64>, usize) {
    let mut groups: HashMap<u32, Vec<usize>> = HashMap::new();
    for (k, &u) in users.iter().enumerate() {
        groups.entry(u).or_default().push(k);
    }
    let mut keys: Vec<u32> = groups.keys().copied().collect();
    keys.sort_unstable();
    let (mut sum, mut counted) = (0.0f64, 0usize);
    for u in keys {
        let idx = &groups[&u];
        if idx.len() < 2 {
            continue;
        }
        let l: Vec<u8> = idx.iter().map(|&k| labels[k]).collect();
        let s: Vec<f64> = idx.iter().map(|&k| scores[k]).collect();
        if let Some(a) = auc(&l, &s) {
            sum += a;
            counted += 1;
        }
    }
    ((counted > 0).then(|| sum / counted as f64), counted)
}

/// A metric as printed in tables: 4 decimals, `-` when undefined.
pub fn fmt_metric(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into())
}

/// AUC, UAUC and size of one set of rows.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    pub auc: Option<f64>,
    pub uauc: Option<f64>,
    pub n: usize,
    pub uauc_users: usize,
}

impl Metrics {
    pub fn compute(users: &[u32], labels: &[u8], scores: &[f64]) -> Self {
        let (uauc, uauc_users) = uauc(users, labels, scores);
        Self {
            auc: auc(labels, scores),
            uauc,
            n: labels.len(),
            uauc_users,
        }
    }
}

/// The report every `collm eval` command prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub auc: Option<f64>,
    pub uauc: Option<f64>,
    pub n: usize,
    pub uauc_users: usize,
    pub subsets: BTreeMap<String, Metrics>,
}

impl Report {
    /// Metrics of `scores` (one per row, in order) on `rows`, overall and on every warm/cold
    /// subset defined by the train counts.
    pub fn compute(counts: &TrainCounts, rows: &[Interaction], scores: &[f64]) -> Result<Self> {
        if rows.len() != scores.len() {
            bail!("{} scores for {} rows", scores.len(), rows.len());
        }
        if let Some(k) = scores.iter().position(|s| !s.is_finite()) {
            bail!(
                "score of row {} is {}: scores must be finite",
                k + 1,
                scores[k]
            );
        }
        let users: Vec<u32> = rows.iter().map(|r| r.uid).collect();
        let labels: Vec<u8> = rows.iter().map(|r| r.label).collect();
        let all = Metrics::compute(&users, &labels, scores);
        let mut subsets = BTreeMap::new();
        for sub in Subset::ALL {
            let mask = sub.mask(counts, rows);
            let pick = |v: &[u32]| -> Vec<u32> {
                v.iter()
                    .zip(&mask)
                    .filter(|(_, &m)| m)
                    .map(|(x, _)| *x)
                    .collect()
            };
            let u = pick(&users);
            let l: Vec<u8> = labels
                .iter()
                .zip(&mask)
                .filter(|(_, &m)| m)
                .map(|(x, _)| *x)
                .collect();
            let s: Vec<f64> = scores
                .iter()
                .zip(&mask)
                .filter(|(_, &m)| m)
                .map(|(x, _)| *x)
                .collect();
            subsets.insert(sub.name().to_string(), Metrics::compute(&u, &l, &s));
        }
        Ok(Self {
            auc: all.auc,
            uauc: all.uauc,
            n: all.n,
            uauc_users: all.uauc_users,
            subsets,
        })
    }

    /// Metrics of scores on a named split of a dataset.
    pub fn for_split(ds: &Dataset, split: &str, scores: &[f64]) -> Result<Self> {
        let counts = TrainCounts::from_dataset(ds)?;
        Self::compute(&counts, &ds.split(split)?.rows, scores)
    }

    /// A short human-readable table.
    pub fn render(&self) -> String {
        let f = fmt_metric;
        let mut s = format!(
            "{:<8} {:>8} {:>8} {:>8} {:>6}\n",
            "rows", "n", "AUC", "UAUC", "users"
        );
        s += &format!(
            "{:<8} {:>8} {:>8} {:>8} {:>6}\n",
            "all",
            self.n,
            f(self.auc),
            f(self.uauc),
            self.uauc_users
        );
        for sub in Subset::ALL {
            if let Some(m) = self.subsets.get(sub.name()) {
                s += &format!(
                    "{:<8} {:>8} {:>8} {:>8} {:>6}\n",
                    sub.name(),
                    m.n,
                    f(m.auc),
                    f(m.uauc),
                    m.uauc_users
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::prelude::*;
    use rand_chacha::ChaCha8Rng;

    /// Pair counting straight from the definition.
    fn brute_auc(labels: &[u8], scores: &[f64]) -> Option<f64> {
        let (mut num, mut den) = (0.0, 0.0);
        for i in 0..labels.len() {
            for j in 0..labels.len() {
                if labels[i] == 1 && labels[j] == 0 {
                    den += 1.0;
                    if scores[i] > scores[j] {
                        num += 1.0;
                    } else if scores[i] == scores[j] {
                        num += 0.5;
                    }
                }
            }
        }
        (den > 0.0).then(|| num / den)
    }

    #[test]
    fn auc_matches_pair_counting_on_random_inputs_with_ties() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for case in 0..200 {
            let n = rng.gen_range(1..80);
            let levels = [2, 5, 1000][case % 3]; // few levels = many ties
            let labels: Vec<u8> = (0..n).map(|_| rng.gen_range(0..2)).collect();
            let scores: Vec<f64> = (0..n)
                .map(|_| rng.gen_range(0..levels) as f64 / 7.0)
                .collect();
            match (auc(&labels, &scores), brute_auc(&labels, &scores)) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-12, "{a} vs {b}"),
                (a, b) => assert_eq!(a, b),
            }
        }
    }

    #[test]
    fn auc_known_values() {
        assert_eq!(auc(&[0, 0, 1, 1], &[0.1, 0.4, 0.35, 0.8]), Some(0.75));
        assert_eq!(auc(&[1, 0], &[0.5, 0.5]), Some(0.5));
        assert_eq!(auc(&[1, 1], &[0.5, 0.2]), None);
    }

    #[test]
    fn uauc_is_the_unweighted_mean_over_eligible_users() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for _ in 0..100 {
            let n = rng.gen_range(1..120);
            let users: Vec<u32> = (0..n).map(|_| rng.gen_range(1..12)).collect();
            let labels: Vec<u8> = (0..n).map(|_| rng.gen_range(0..2)).collect();
            let scores: Vec<f64> = (0..n).map(|_| rng.gen_range(0..6) as f64).collect();
            let mut per_user = Vec::new();
            for u in 1..12u32 {
                let idx: Vec<usize> = (0..n).filter(|&k| users[k] == u).collect();
                if idx.len() < 2 {
                    continue;
                }
                let l: Vec<u8> = idx.iter().map(|&k| labels[k]).collect();
                let s: Vec<f64> = idx.iter().map(|&k| scores[k]).collect();
                if let Some(a) = brute_auc(&l, &s) {
                    per_user.push(a);
                }
            }
            let (got, counted) = uauc(&users, &labels, &scores);
            assert_eq!(counted, per_user.len());
            match got {
                Some(g) => {
                    let want = per_user.iter().sum::<f64>() / per_user.len() as f64;
                    assert!((g - want).abs() < 1e-12);
                }
                None => assert!(per_user.is_empty()),
            }
        }
    }

    #[test]
    fn report_subsets_follow_train_counts() {
        let row = |uid, iid, label| Interaction {
            uid,
            iid,
            label,
            timestamp: 0,
            history: vec![],
        };
        // Train: user 1 has 3 rows, user 2 has 4; item 1 has 4, item 2 has 3.
        let train = vec![
            row(1, 1, 1),
            row(1, 1, 0),
            row(1, 2, 1),
            row(2, 1, 1),
            row(2, 1, 0),
            row(2, 2, 1),
            row(2, 2, 0),
        ];
        let counts = TrainCounts::from_rows(&train);
        let test = vec![row(1, 1, 1), row(2, 1, 0), row(2, 2, 1), row(3, 1, 0)];
        let r = Report::compute(&counts, &test, &[0.9, 0.1, 0.8, 0.2]).unwrap();
        assert_eq!(r.n, 4);
        assert_eq!(r.subsets["warm"].n, 3);
        assert_eq!(r.subsets["cold"].n, 1);
        assert_eq!(r.subsets["warm4"].n, 1); // only (2, 1)
        assert_eq!(r.subsets["cold4"].n, 3);
        assert_eq!(r.subsets["seen"].n, 3);
        assert_eq!(r.subsets["unseen"].n, 1);
        assert_eq!(r.auc, Some(1.0));
        assert_eq!(r.subsets["warm4"].auc, None);
        assert!(Report::compute(&counts, &test, &[0.1; 3]).is_err());
        assert!(Report::compute(&counts, &test, &[0.1, f64::NAN, 0.1, 0.1]).is_err());
    }
}
