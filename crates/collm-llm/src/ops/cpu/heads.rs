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

avx512_dispatch! {
    /// [`masked_softmax`] where the real keys are the ranges `runs` (ascending, disjoint,
    /// within the row; empty ones allowed): the same values, bit for bit (the same maximum, the
    /// same exponentials, zeros elsewhere, the same [`lane_sum`] over the whole row), with no
    /// test per key, so that the loops vectorize.
    pub(super) fn softmax_runs(row: &mut [f32], runs: &[(usize, usize)]) {
        let mut max = f32::NEG_INFINITY;
        for &(a, b) in runs {
            if a < b {
                max = max.max(lane_max(&row[a..b]));
            }
        }
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        let mut done = 0;
        for &(a, b) in runs {
            row[done..a].fill(0.0);
            for x in &mut row[a..b] {
                *x = exp(*x - max);
            }
            done = done.max(b);
        }
        row[done..].fill(0.0);
        let inv = 1.0 / lane_sum(row);
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// [`softmax_runs`] gives [`masked_softmax`]'s values bit for bit, in both of its builds,
    /// for the runs prefix attention passes ([0, tp) and a causal suffix run, either empty):
    /// every real entry, zeros elsewhere, and an all-zero row without real keys.
    #[test]
    fn softmax_runs_is_the_masked_softmax_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let len = 37;
        for case in 0..400 {
            let row: Vec<f32> = (0..len).map(|_| rng.gen_range(-6.0f32..6.0)).collect();
            let tp = rng.gen_range(0..=20);
            let a = rng.gen_range(tp..=len);
            let b = rng.gen_range(a..=len);
            let runs = [(0, tp), (a, b)];
            let mut want = row.clone();
            masked_softmax(&mut want, |j| j < tp || (a..b).contains(&j));
            for narrow in [false, true] {
                NARROW.store(narrow, std::sync::atomic::Ordering::Relaxed);
                let mut got = row.clone();
                softmax_runs(&mut got, &runs);
                NARROW.store(false, std::sync::atomic::Ordering::Relaxed);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "case {case} {runs:?} narrow {narrow}: {got:?} vs {want:?}"
                );
                if tp == 0 && a == b {
                    assert!(got.iter().all(|&x| x == 0.0), "no real key: zeros");
                } else {
                    let sum: f32 = got.iter().sum();
                    assert!((sum - 1.0).abs() < 1e-5, "case {case}: sum {sum}");
                }
            }
        }
    }
}
