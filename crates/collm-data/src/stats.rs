//! Dataset statistics: the paper's Table 1 columns and what else helps to judge a split.

use crate::dataset::Dataset;
use crate::subsets::{Subset, TrainCounts};
use anyhow::Result;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

/// Prompts show the last 10 history titles (reference-spec §2).
pub const PROMPT_HISTORY: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct HistoryStats {
    pub mean: f64,
    pub median: f64,
    pub p90: usize,
    pub max: usize,
    /// Rows whose prompt history, `min(len, 10)`, has 0, 1, …, 10 items.
    pub prompt_length_counts: Vec<usize>,
    pub prompt_length_mean: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SplitStats {
    pub rows: usize,
    pub users: usize,
    pub items: usize,
    pub positives: usize,
    pub positive_rate: f64,
    /// Users with at least two rows and both labels: the ones UAUC averages over.
    pub uauc_users: usize,
    pub history: HistoryStats,
    /// Rows per warm/cold subset (see `collm_data::subsets`).
    pub subsets: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatasetStats {
    pub name: String,
    /// Largest user id + 1: counts the padding id 0, as the paper's Table 1 does.
    pub num_users: usize,
    /// Largest item id + 1, padding id 0 included.
    pub num_items: usize,
    /// Distinct users and items that appear in any split (no padding).
    pub distinct_users: usize,
    pub distinct_items: usize,
    pub splits: BTreeMap<String, SplitStats>,
}

fn history_stats(lengths: &mut [usize]) -> HistoryStats {
    lengths.sort_unstable();
    let n = lengths.len();
    let mut counts = vec![0usize; PROMPT_HISTORY + 1];
    for &l in lengths.iter() {
        counts[l.min(PROMPT_HISTORY)] += 1;
    }
    let mean = |v: &[usize]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<usize>() as f64 / v.len() as f64
        }
    };
    let capped: Vec<usize> = lengths.iter().map(|&l| l.min(PROMPT_HISTORY)).collect();
    HistoryStats {
        mean: mean(lengths),
        median: match n {
            0 => 0.0,
            _ if n % 2 == 1 => lengths[n / 2] as f64,
            _ => (lengths[n / 2 - 1] + lengths[n / 2]) as f64 / 2.0,
        },
        p90: if n == 0 {
            0
        } else {
            lengths[((n as f64 * 0.9).ceil() as usize).clamp(1, n) - 1]
        },
        max: lengths.last().copied().unwrap_or(0),
        prompt_length_counts: counts,
        prompt_length_mean: mean(&capped),
    }
}

pub fn compute(ds: &Dataset) -> Result<DatasetStats> {
    let counts = TrainCounts::from_dataset(ds)?;
    let mut all_users = HashSet::new();
    let mut all_items = HashSet::new();
    let mut splits = BTreeMap::new();
    for split in &ds.splits {
        let rows = &split.rows;
        let mut users = HashSet::new();
        let mut items = HashSet::new();
        // Per user: rows, positives.
        let mut per_user: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
        for r in rows {
            users.insert(r.uid);
            items.insert(r.iid);
            let e = per_user.entry(r.uid).or_default();
            e.0 += 1;
            e.1 += r.label as usize;
        }
        all_users.extend(users.iter().copied());
        all_items.extend(items.iter().copied());
        let positives = rows.iter().filter(|r| r.label == 1).count();
        let mut lengths: Vec<usize> = rows.iter().map(|r| r.history.len()).collect();
        let subsets = Subset::ALL
            .iter()
            .map(|s| {
                let n = rows
                    .iter()
                    .filter(|r| s.contains(&counts, r.uid, r.iid))
                    .count();
                (s.name().to_string(), n)
            })
            .collect();
        splits.insert(
            split.name.clone(),
            SplitStats {
                rows: rows.len(),
                users: users.len(),
                items: items.len(),
                positives,
                positive_rate: if rows.is_empty() {
                    0.0
                } else {
                    positives as f64 / rows.len() as f64
                },
                uauc_users: per_user
                    .values()
                    .filter(|&&(n, p)| n >= 2 && p > 0 && p < n)
                    .count(),
                history: history_stats(&mut lengths),
                subsets,
            },
        );
    }
    Ok(DatasetStats {
        name: ds.manifest.name.clone(),
        num_users: ds.num_users(),
        num_items: ds.num_items(),
        distinct_users: all_users.len(),
        distinct_items: all_items.len(),
        splits,
    })
}

/// The human-readable report of `collm data stats`.
pub fn render(stats: &DatasetStats) -> String {
    let mut s = String::new();
    let rows = |name: &str| stats.splits.get(name).map(|x| x.rows.to_string());
    let _ = writeln!(s, "Dataset: {}", stats.name);
    let _ = writeln!(s, "\nTable 1 (as in the paper)");
    let _ = writeln!(
        s,
        "  {:<12} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "dataset", "#Train", "#Valid", "#Test", "#User", "#Item"
    );
    let _ = writeln!(
        s,
        "  {:<12} {:>10} {:>10} {:>10} {:>8} {:>8}",
        stats.name,
        rows("train").unwrap_or("-".into()),
        rows("valid").unwrap_or("-".into()),
        rows("test").unwrap_or("-".into()),
        stats.num_users,
        stats.num_items
    );
    let _ = writeln!(
        s,
        "  #User and #Item count the padding id 0 (largest id + 1), as the paper's Table 1 does;\n  distinct users / items in the data: {} / {}.",
        stats.distinct_users, stats.distinct_items
    );
    let _ = writeln!(s, "\nPer split");
    let _ = writeln!(
        s,
        "  {:<6} {:>8} {:>7} {:>7} {:>8} {:>9} {:>10} {:>8} {:>8} {:>6}",
        "split",
        "rows",
        "users",
        "items",
        "pos.rate",
        "uauc-usr",
        "hist.mean",
        "median",
        "p90",
        "max"
    );
    for name in crate::dataset::SPLIT_NAMES {
        let Some(x) = stats.splits.get(name) else {
            continue;
        };
        let _ = writeln!(
            s,
            "  {:<6} {:>8} {:>7} {:>7} {:>8.4} {:>9} {:>10.1} {:>8.1} {:>8} {:>6}",
            name,
            x.rows,
            x.users,
            x.items,
            x.positive_rate,
            x.uauc_users,
            x.history.mean,
            x.history.median,
            x.history.p90,
            x.history.max
        );
    }
    let _ = writeln!(
        s,
        "\nPrompt history length, min(len, {PROMPT_HISTORY}): rows with 0..{PROMPT_HISTORY} titles"
    );
    for name in crate::dataset::SPLIT_NAMES {
        if let Some(x) = stats.splits.get(name) {
            let counts: Vec<String> = x
                .history
                .prompt_length_counts
                .iter()
                .map(|c| c.to_string())
                .collect();
            let _ = writeln!(
                s,
                "  {:<6} {}  (mean {:.2})",
                name,
                counts.join(" "),
                x.history.prompt_length_mean
            );
        }
    }
    let _ = writeln!(
        s,
        "\nWarm/cold rows (train counts; see `collm eval --help`)"
    );
    let _ = write!(s, "  {:<6}", "split");
    for sub in Subset::ALL {
        let _ = write!(s, " {:>8}", sub.name());
    }
    let _ = writeln!(s);
    for name in crate::dataset::SPLIT_NAMES {
        if let Some(x) = stats.splits.get(name) {
            let _ = write!(s, "  {name:<6}");
            for sub in Subset::ALL {
                let _ = write!(s, " {:>8}", x.subsets.get(sub.name()).copied().unwrap_or(0));
            }
            let _ = writeln!(s);
        }
    }
    for sub in Subset::ALL {
        let _ = writeln!(s, "  {:<7} {}", sub.name(), sub.describe());
    }
    s
}
