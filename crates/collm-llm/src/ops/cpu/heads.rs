//! Pieces the attention kernels share: one head of a (B, T, n, hd) activation as a contiguous
//! (T × hd) block and back, and the masked softmax of a row of scores.

use super::*;

/// The shape of a (B, T, n, hd) activation: heads side by side in each position's row.
#[derive(Clone, Copy)]
pub(super) struct Heads {
    pub batch: usize,
    pub seq: usize,
    pub n: usize,
    pub hd: usize,
}

impl Heads {
    /// Appends head `h` of batch row `b` of `x` to `out` as a contiguous (T × hd) block.
    pub fn gather_into(&self, x: &[f32], b: usize, h: usize, out: &mut Vec<f32>) {
        let (t, n, hd) = (self.seq, self.n, self.hd);
        for i in 0..t {
            let r = ((b * t + i) * n + h) * hd;
            out.extend_from_slice(&x[r..r + hd]);
        }
    }

    /// Head `h` of batch row `b` of `x` as a contiguous (T × hd) block.
    pub fn gather(&self, x: &[f32], b: usize, h: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.seq * self.hd);
        self.gather_into(x, b, h, &mut out);
        out
    }

    /// The (B, T, n, hd) activation whose head `h` of batch row `b` is the (T × hd) block
    /// `block(b, h)`.
    pub fn scatter<'a>(&self, block: impl Fn(usize, usize) -> &'a [f32] + Sync) -> Vec<f32> {
        let (bsz, t, n, hd) = (self.batch, self.seq, self.n, self.hd);
        let len = bsz * t * n * hd;
        // Written in full below: never zeroed first (a zeroing pass costs as much as the copy).
        let mut out = Vec::with_capacity(len);
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(n * hd)
            .enumerate()
            .for_each(|(bt, row)| {
                let (b, i) = (bt / t, bt % t);
                for h in 0..n {
                    let src = &block(b, h)[i * hd..(i + 1) * hd];
                    for (d, s) in row[h * hd..(h + 1) * hd].iter_mut().zip(src) {
                        d.write(*s);
                    }
                }
            });
        // SAFETY: every element was written above (each row's n heads of hd values).
        unsafe { out.set_len(len) };
        out
    }
}

/// Softmax of the scores in `row` over the keys `real(j)` admits, in place: every other entry
/// becomes 0, and a row with no real key becomes all zeros. Sums as [`lane_sum`] over the row.
#[inline]
pub(super) fn masked_softmax(row: &mut [f32], real: impl Fn(usize) -> bool) {
    let mut max = f32::NEG_INFINITY;
    for (j, &x) in row.iter().enumerate() {
        if real(j) {
            max = max.max(x);
        }
    }
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    for (j, x) in row.iter_mut().enumerate() {
        *x = if real(j) { exp(*x - max) } else { 0.0 };
    }
    let inv = 1.0 / lane_sum(row);
    for x in row.iter_mut() {
        *x *= inv;
    }
}
