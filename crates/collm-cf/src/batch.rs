//! Batches of interactions as tensors.

use crate::nn::index_tensor;
use anyhow::Result;
use candle_core::{Device, Tensor};
use collm_data::Interaction;

pub struct CfBatch {
    /// (B,) u32
    pub users: Tensor,
    /// (B,) u32
    pub items: Tensor,
    /// (B, L) u32: the last L history items, oldest first, left-padded with 0. L may be 0.
    pub history: Tensor,
    /// (B,) f32 in {0, 1}
    pub labels: Tensor,
    pub len: usize,
    pub history_len: usize,
}

impl CfBatch {
    pub fn new(rows: &[&Interaction], history_len: usize, device: &Device) -> Result<Self> {
        let b = rows.len();
        let users: Vec<u32> = rows.iter().map(|r| r.uid).collect();
        let items: Vec<u32> = rows.iter().map(|r| r.iid).collect();
        let labels: Vec<f32> = rows.iter().map(|r| r.label as f32).collect();
        let mut hist = vec![0u32; b * history_len];
        for (k, r) in rows.iter().enumerate() {
            let take = r.history.len().min(history_len);
            let src = &r.history[r.history.len() - take..];
            hist[k * history_len + history_len - take..(k + 1) * history_len].copy_from_slice(src);
        }
        Ok(Self {
            users: index_tensor(&users, &[b], device)?,
            items: index_tensor(&items, &[b], device)?,
            history: index_tensor(&hist, &[b, history_len], device)?,
            labels: Tensor::from_vec(labels, b, device)?,
            len: b,
            history_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_the_most_recent_items_left_padded() {
        let r1 = Interaction {
            uid: 1,
            iid: 2,
            label: 1,
            timestamp: 0,
            history: vec![5, 6, 7, 8],
        };
        let r2 = Interaction {
            history: vec![9],
            ..r1.clone()
        };
        let b = CfBatch::new(&[&r1, &r2], 3, &Device::Cpu).unwrap();
        assert_eq!(
            b.history.to_vec2::<u32>().unwrap(),
            vec![vec![6, 7, 8], vec![0, 0, 9]]
        );
    }
}
