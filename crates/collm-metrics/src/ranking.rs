//! Top-K ranking metrics over sampled candidates (the leave-one-out protocol of NCF and its
//! successors): each *case* is one positive item ranked against sampled negatives.
//!
//! - the positive's rank is 1 + the number of negatives scoring **at or above** it (ties
//!   count against the positive, so a constant scorer is not rewarded);
//! - HR@K: the share of cases whose positive ranks within K;
//! - NDCG@K: the mean of 1 / log2(rank + 1) over cases ranked within K (0 otherwise; one
//!   relevant item, so the ideal DCG is 1);
//! - MRR: the mean of 1 / rank.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The rank (1-based) of a positive scored `pos` among negatives scored `negs`.
pub fn rank_of(pos: f64, negs: &[f64]) -> usize {
    1 + negs.iter().filter(|&&s| s >= pos).count()
}

/// What `collm rank` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankingReport {
    #[serde(rename = "hr@K")]
    pub hr: f64,
    #[serde(rename = "ndcg@K")]
    pub ndcg: f64,
    pub mrr: f64,
    /// Distinct users with at least one case.
    pub users: usize,
    /// Cases (positive rows) ranked.
    pub cases: usize,
    /// Candidates per case asked for (the positive included).
    pub candidates: usize,
    /// Candidates per case on average: fewer than asked where a user has not left enough
    /// unseen items to sample from.
    pub mean_candidates: f64,
    pub k: usize,
}

impl RankingReport {
    /// From each case's (user, rank of the positive, candidate count).
    pub fn new(cases: &[(u32, usize, usize)], candidates: usize, k: usize) -> Self {
        let n = cases.len().max(1) as f64;
        let hits = cases.iter().filter(|c| c.1 <= k).count() as f64;
        let ndcg: f64 = cases
            .iter()
            .filter(|c| c.1 <= k)
            .map(|c| 1.0 / ((c.1 + 1) as f64).log2())
            .sum();
        let mrr: f64 = cases.iter().map(|c| 1.0 / c.1 as f64).sum();
        let users: HashSet<u32> = cases.iter().map(|c| c.0).collect();
        Self {
            hr: hits / n,
            ndcg: ndcg / n,
            mrr: mrr / n,
            users: users.len(),
            cases: cases.len(),
            candidates,
            mean_candidates: cases.iter().map(|c| c.2 as f64).sum::<f64>() / n,
            k,
        }
    }

    /// The JSON object with the metric names spelled out for this K (`"hr@10"`, …).
    pub fn to_json(&self) -> serde_json::Value {
        let k = self.k;
        serde_json::json!({
            format!("hr@{k}"): self.hr,
            format!("ndcg@{k}"): self.ndcg,
            "mrr": self.mrr,
            "users": self.users,
            "cases": self.cases,
            "candidates": self.candidates,
            "mean_candidates": self.mean_candidates,
            "k": k,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_count_ties_against_the_positive() {
        assert_eq!(rank_of(0.9, &[0.1, 0.5, 0.2]), 1);
        assert_eq!(rank_of(0.3, &[0.1, 0.5, 0.2]), 2);
        assert_eq!(rank_of(0.0, &[0.0, 0.0, 0.0]), 4);
        assert_eq!(rank_of(1.0, &[]), 1);
    }

    #[test]
    fn metrics_on_hand_made_ranks() {
        // Ranks 1, 3 and 12 at K = 10: two hits; NDCG = (1/log2 2 + 1/log2 4) / 3.
        let r = RankingReport::new(&[(1, 1, 100), (1, 3, 100), (2, 12, 40)], 100, 10);
        assert!((r.hr - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.ndcg - (1.0 + 0.5) / 3.0).abs() < 1e-12);
        assert!((r.mrr - (1.0 + 1.0 / 3.0 + 1.0 / 12.0) / 3.0).abs() < 1e-12);
        assert_eq!((r.users, r.cases, r.k), (2, 3, 10));
        assert!((r.mean_candidates - 80.0).abs() < 1e-12);
        let j = r.to_json();
        assert!(j.get("hr@10").is_some() && j.get("ndcg@10").is_some());
    }
}
