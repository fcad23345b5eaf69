//! The reference's history rule (`deal_with_each_u`, reference-spec §1.1), shared by every raw
//! source: rows of all splits are sorted by (user, timestamp) — a *stable* sort, so rows with
//! equal timestamps keep the order in which the source yields them (for raw files: file order)
//! — and each row's history is the list of that user's earlier positive items, oldest first,
//! taken *before* the row's own item is added. Histories span the splits: a test row sees
//! earlier valid/test positives too, and nothing from before the data window.

use crate::dataset::{Interaction, Split};

/// Which split a row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SplitTag {
    Train,
    Valid,
    Test,
}

impl SplitTag {
    pub fn name(self) -> &'static str {
        match self {
            SplitTag::Train => "train",
            SplitTag::Valid => "valid",
            SplitTag::Test => "test",
        }
    }
}

/// A row with final ids but no history yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRow {
    pub uid: u32,
    pub iid: u32,
    pub label: u8,
    pub timestamp: i64,
    pub split: SplitTag,
}

/// Sorts `rows` stably by (uid, timestamp), builds every row's history and groups the rows
/// into train / valid / test (each in (uid, timestamp) order). Empty valid/test splits are
/// kept; an empty test split is dropped only when `keep_empty_test` is false.
pub fn build_splits(mut rows: Vec<RawRow>, keep_empty_test: bool) -> Vec<Split> {
    rows.sort_by_key(|r| (r.uid, r.timestamp));
    let mut out: [Vec<Interaction>; 3] = Default::default();
    let mut current_user = None;
    let mut history: Vec<u32> = Vec::new();
    for r in rows {
        if current_user != Some(r.uid) {
            current_user = Some(r.uid);
            history.clear();
        }
        out[r.split as usize].push(Interaction {
            uid: r.uid,
            iid: r.iid,
            label: r.label,
            timestamp: r.timestamp,
            history: history.clone(),
        });
        if r.label == 1 {
            history.push(r.iid);
        }
    }
    let [train, valid, test] = out;
    let mut splits = vec![
        Split {
            name: "train".into(),
            rows: train,
        },
        Split {
            name: "valid".into(),
            rows: valid,
        },
    ];
    if keep_empty_test || !test.is_empty() {
        splits.push(Split {
            name: "test".into(),
            rows: test,
        });
    }
    splits
}

/// Assigns dense ids 1..N to keys in the order they are first seen (0 stays the padding id).
#[derive(Debug, Default)]
pub struct IdMap<K: std::hash::Hash + Eq> {
    ids: std::collections::HashMap<K, u32>,
}

impl<K: std::hash::Hash + Eq> IdMap<K> {
    pub fn new() -> Self {
        Self {
            ids: std::collections::HashMap::new(),
        }
    }

    pub fn id(&mut self, key: K) -> u32 {
        let next = self.ids.len() as u32 + 1;
        *self.ids.entry(key).or_insert(next)
    }

    pub fn get(&self, key: &K) -> Option<u32> {
        self.ids.get(key).copied()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// (key, id) pairs in id order.
    pub fn into_sorted(self) -> Vec<(K, u32)> {
        let mut v: Vec<_> = self.ids.into_iter().collect();
        v.sort_by_key(|&(_, id)| id);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(uid: u32, iid: u32, label: u8, ts: i64, split: SplitTag) -> RawRow {
        RawRow {
            uid,
            iid,
            label,
            timestamp: ts,
            split,
        }
    }

    #[test]
    fn history_is_earlier_positives_across_splits_and_ties_keep_input_order() {
        use SplitTag::*;
        let rows = vec![
            raw(2, 9, 1, 5, Train),
            raw(1, 3, 1, 10, Valid),
            raw(1, 1, 1, 1, Train),
            raw(1, 2, 0, 1, Train), // same timestamp as item 1: stays after it
            raw(1, 4, 0, 20, Test),
            raw(1, 5, 1, 10, Valid), // tie with item 3, which came first
        ];
        let s = build_splits(rows, true);
        let hist = |split: usize| -> Vec<(u32, Vec<u32>)> {
            s[split]
                .rows
                .iter()
                .map(|r| (r.iid, r.history.clone()))
                .collect()
        };
        assert_eq!(
            hist(0),
            vec![(1, vec![]), (2, vec![1]), (9, vec![])],
            "train"
        );
        assert_eq!(hist(1), vec![(3, vec![1]), (5, vec![1, 3])], "valid");
        assert_eq!(hist(2), vec![(4, vec![1, 3, 5])], "test");
    }

    #[test]
    fn id_map_is_first_seen_order_from_one() {
        let mut m = IdMap::new();
        assert_eq!(m.id("b"), 1);
        assert_eq!(m.id("a"), 2);
        assert_eq!(m.id("b"), 1);
        assert_eq!(m.into_sorted(), vec![("b", 1), ("a", 2)]);
    }
}
