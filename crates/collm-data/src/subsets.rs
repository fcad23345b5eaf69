//! Row subsets for warm/cold evaluation (reference-spec §1.3). The paper and the reference
//! code disagree, so each definition is available under its own name:
//!
//! | name     | a row is in it when                                         | source          |
//! |----------|-------------------------------------------------------------|-----------------|
//! | `warm`   | its user and its item each have ≥ 3 rows in train            | paper §5.2.2    |
//! | `cold`   | not `warm`                                                  | paper ("rest")  |
//! | `warm4`  | user and item each have ≥ 4 rows in train                    | reference code  |
//! | `cold4`  | not `warm4`                                                 |                 |
//! | `seen`   | user and item both appear in train (`not_cold == 1`)          | reference code  |
//! | `unseen` | not `seen` (`not_cold == 0`)                                 | reference code  |
//!
//! Train rows count whatever their label.

use crate::dataset::{Dataset, Interaction};
use anyhow::Result;

/// How many train rows each user and each item has.
#[derive(Debug, Clone)]
pub struct TrainCounts {
    pub user: Vec<u32>,
    pub item: Vec<u32>,
}

impl TrainCounts {
    pub fn from_rows(train: &[Interaction]) -> Self {
        let nu = train.iter().map(|r| r.uid).max().unwrap_or(0) as usize + 1;
        let ni = train.iter().map(|r| r.iid).max().unwrap_or(0) as usize + 1;
        let mut user = vec![0u32; nu];
        let mut item = vec![0u32; ni];
        for r in train {
            user[r.uid as usize] += 1;
            item[r.iid as usize] += 1;
        }
        Self { user, item }
    }

    pub fn from_dataset(ds: &Dataset) -> Result<Self> {
        Ok(Self::from_rows(&ds.train()?.rows))
    }

    pub fn user(&self, uid: u32) -> u32 {
        self.user.get(uid as usize).copied().unwrap_or(0)
    }

    pub fn item(&self, iid: u32) -> u32 {
        self.item.get(iid as usize).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subset {
    Warm,
    Cold,
    Warm4,
    Cold4,
    Seen,
    Unseen,
}

impl Subset {
    pub const ALL: [Subset; 6] = [
        Subset::Warm,
        Subset::Cold,
        Subset::Warm4,
        Subset::Cold4,
        Subset::Seen,
        Subset::Unseen,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Subset::Warm => "warm",
            Subset::Cold => "cold",
            Subset::Warm4 => "warm4",
            Subset::Cold4 => "cold4",
            Subset::Seen => "seen",
            Subset::Unseen => "unseen",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Subset::Warm => "user and item each >= 3 train rows (paper)",
            Subset::Cold => "not warm",
            Subset::Warm4 => "user and item each >= 4 train rows (reference code)",
            Subset::Cold4 => "not warm4",
            Subset::Seen => "user and item both in train (not_cold = 1)",
            Subset::Unseen => "not seen (not_cold = 0)",
        }
    }

    pub fn contains(self, counts: &TrainCounts, uid: u32, iid: u32) -> bool {
        let at_least = |k: u32| counts.user(uid) >= k && counts.item(iid) >= k;
        match self {
            Subset::Warm => at_least(3),
            Subset::Cold => !at_least(3),
            Subset::Warm4 => at_least(4),
            Subset::Cold4 => !at_least(4),
            Subset::Seen => at_least(1),
            Subset::Unseen => !at_least(1),
        }
    }

    /// Membership of every row, in order.
    pub fn mask(self, counts: &TrainCounts, rows: &[Interaction]) -> Vec<bool> {
        rows.iter()
            .map(|r| self.contains(counts, r.uid, r.iid))
            .collect()
    }
}
