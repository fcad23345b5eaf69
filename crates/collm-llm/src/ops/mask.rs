//! Which positions of a padded batch are real ([`Mask`]), and what attention reads in one
//! pass ([`Positions`]): the mask, the position ids and the RoPE tables, each in the form the
//! chosen implementation needs, built the first time that implementation asks for it.

use super::cpu::RopeTables;
use super::reference;
use candle_core::{DType, Device, Result, Tensor};
use std::sync::{Arc, OnceLock};

/// Which positions of a padded batch are real tokens. Cheap to clone (the bytes are shared).
#[derive(Debug, Clone)]
pub struct Mask {
    pub batch: usize,
    pub seq: usize,
    /// Row-major (batch, seq); 1 = real token.
    pub data: Arc<Vec<u8>>,
}

impl Mask {
    fn from_rows(
        lens: &[usize],
        seq: usize,
        row: impl Fn(usize) -> std::ops::Range<usize>,
    ) -> Self {
        let mut data = vec![0u8; lens.len() * seq];
        for k in 0..lens.len() {
            let r = row(k);
            data[k * seq + r.start..k * seq + r.end].fill(1);
        }
        Self {
            batch: lens.len(),
            seq,
            data: Arc::new(data),
        }
    }

    /// Left padding: row `k` holds `lens[k]` real tokens at its end.
    pub fn left_padded(lens: &[usize], seq: usize) -> Self {
        Self::from_rows(lens, seq, |k| seq - lens[k]..seq)
    }

    /// Right padding: row `k` holds `lens[k]` real tokens at its start.
    pub fn right_padded(lens: &[usize], seq: usize) -> Self {
        Self::from_rows(lens, seq, |k| 0..lens[k])
    }

    /// Row `b`'s bytes.
    pub fn row(&self, b: usize) -> &[u8] {
        &self.data[b * self.seq..(b + 1) * self.seq]
    }

    /// Each row's last real position.
    pub fn last_positions(&self) -> Vec<usize> {
        (0..self.batch)
            .map(|b| {
                (0..self.seq)
                    .rev()
                    .find(|&t| self.data[b * self.seq + t] == 1)
                    .unwrap_or(self.seq - 1)
            })
            .collect()
    }

    /// Position ids that follow the mask: the k-th real token of a row has position k.
    pub fn position_ids(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.batch * self.seq];
        for b in 0..self.batch {
            let mut p = 0f32;
            for t in 0..self.seq {
                // Padding takes the position of the next real token; it is masked anyway.
                out[b * self.seq + t] = p;
                if self.data[b * self.seq + t] == 1 {
                    p += 1.0;
                }
            }
        }
        out
    }

    /// Position ids of rows that continue prefixes of `offsets[b]` tokens.
    pub fn position_ids_after(&self, offsets: &[usize]) -> Vec<f32> {
        let mut p = self.position_ids();
        for (row, &o) in offsets.iter().enumerate() {
            for x in &mut p[row * self.seq..(row + 1) * self.seq] {
                *x += o as f32;
            }
        }
        p
    }
}

/// What attention reads in one pass over a (B, T) batch: its [`Mask`], each position's id
/// (following the mask, optionally continuing cached prefixes) and RoPE's frequencies. The CPU
/// kernels read [`RopeTables`]; the reference ops read cos/sin tensors and an additive bias on
/// the device. Each is built once, when an op first needs it, and never for the other path.
pub struct Positions {
    mask: Mask,
    ids: Vec<f32>,
    inv_freq: Arc<Vec<f32>>,
    dtype: DType,
    device: Device,
    tables: OnceLock<RopeTables>,
    cos_sin: OnceLock<(Tensor, Tensor)>,
    bias: OnceLock<Tensor>,
}

impl Positions {
    /// Positions of `mask`'s batch; with `offsets`, row `b` continues a prefix of
    /// `offsets[b]` tokens. Tensors for the reference path are made in `dtype` on `device`.
    pub fn new(
        mask: &Mask,
        offsets: Option<&[usize]>,
        inv_freq: Arc<Vec<f32>>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let ids = match offsets {
            Some(off) => mask.position_ids_after(off),
            None => mask.position_ids(),
        };
        Self {
            mask: mask.clone(),
            ids,
            inv_freq,
            dtype,
            device: device.clone(),
            tables: OnceLock::new(),
            cos_sin: OnceLock::new(),
            bias: OnceLock::new(),
        }
    }

    pub fn mask(&self) -> &Mask {
        &self.mask
    }

    /// The CPU kernels' cos/sin tables, (B·T, hd/2) each.
    pub fn tables(&self) -> &RopeTables {
        self.tables
            .get_or_init(|| RopeTables::new(&self.ids, &self.inv_freq))
    }

    /// The CPU kernels' tables of some flat (b·T + t) rows.
    pub fn tables_at(&self, flat: &[usize]) -> RopeTables {
        self.tables().rows(flat)
    }

    /// The reference path's cos/sin, (B, T, 1, hd) each, both halves filled.
    pub fn cos_sin(&self) -> Result<&(Tensor, Tensor)> {
        if let Some(cs) = self.cos_sin.get() {
            return Ok(cs);
        }
        let (b, t) = (self.mask.batch, self.mask.seq);
        let n = self.inv_freq.len();
        let inv = Tensor::from_vec(self.inv_freq.to_vec(), (1, 1, n), &self.device)?;
        let pos = Tensor::from_vec(self.ids.clone(), (b, t, 1), &self.device)?;
        let freqs = pos.broadcast_mul(&inv)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], 2)?.unsqueeze(2)?;
        let cs = (
            freqs.cos()?.to_dtype(self.dtype)?,
            freqs.sin()?.to_dtype(self.dtype)?,
        );
        Ok(self.cos_sin.get_or_init(|| cs))
    }

    /// The reference path's additive bias (B, 1, T, T): causal and key padding.
    pub fn bias(&self) -> Result<&Tensor> {
        if let Some(b) = self.bias.get() {
            return Ok(b);
        }
        let b = reference::attention_bias(&self.mask, self.dtype, &self.device)?;
        Ok(self.bias.get_or_init(|| b))
    }

    /// The reference path's bias (B, 1, 1, T) for one query per row at `positions[b]`: the
    /// row's real keys up to its position.
    pub fn bias_at(&self, positions: &[usize]) -> Result<Tensor> {
        reference::attention_bias_at(&self.mask, positions, self.dtype, &self.device)
    }
}
