//! Inverted dropout drawing the composed op's ChaCha stream in parallel; masks kept as bits.

use super::*;

struct Dropout {
    mask: DropMask,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _span = times::span("dropout");
        let x = as_f32(s, l)?;
        if x.len().div_ceil(64) != self.mask.keep.len() {
            bail!(
                "dropout: a mask of {} words for {} elements",
                self.mask.keep.len(),
                x.len()
            );
        }
        Ok((from_f32(self.mask.apply(&x), s.dtype())?, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Linear in x: the gradient goes through the same mask.
        let op = Dropout {
            mask: self.mask.clone(),
        };
        Ok(Some(grad.contiguous()?.apply_op1(op)?))
    }
}

/// Inverted dropout with probability `p`, drawing exactly what `collm_nn::layers::dropout`
/// draws from `rng`: one `f64` per element in row-major order, dropped when below `p` (so runs
/// and checkpoints from before the fused kernels replay the same masks). ChaCha is
/// counter-based, so chunks of the mask are drawn in parallel by seeking to their word
/// position; `rng` ends where the sequential draws would leave it. The mask is kept as bits
/// for the backward pass.
pub fn dropout(x: &Tensor, p: f64, rng: &mut rand_chacha::ChaCha8Rng) -> Result<Tensor> {
    let mask = dropout_mask(x.elem_count(), p, rng)?;
    x.contiguous()?.apply_op1(Dropout { mask })
}

/// The keep mask of an inverted dropout of `n` elements with probability `p`, as bits, and
/// its scale `1/(1-p)`: the draws of [`dropout`] (and of `collm_nn::layers::dropout`), for ops
/// that apply the mask themselves ([`linear`]'s LoRA path).
#[derive(Clone)]
pub struct DropMask {
    /// Bit `i` set: element `i` is kept (and scaled).
    pub(super) keep: Arc<Vec<u64>>,
    pub(super) scale: f32,
}

impl DropMask {
    /// `x ⊙ mask · scale`, element-wise over a flat slice of the mask's length.
    pub(super) fn apply(&self, x: &[f32]) -> Vec<f32> {
        // Written in full below: never zeroed first.
        let mut y = Vec::with_capacity(x.len());
        self.each_word(&mut y.spare_capacity_mut()[..x.len()], x, |y, v| {
            y.write(v);
        });
        // SAFETY: every element was written above (the chunks cover all x.len()).
        unsafe { y.set_len(x.len()) };
        y
    }

    /// Calls `put(y, x · keep · scale)` for each pair of `y` and `x` (the mask's length), in
    /// parallel chunks of whole words (each through [`DropMask::each_in_row`]'s 32-bit path).
    fn each_word<Y: Send>(&self, y: &mut [Y], x: &[f32], put: impl Fn(&mut Y, f32) + Sync) {
        // Every element of y is visited (what `apply`'s set_len relies on).
        assert!(
            x.len() == y.len() && self.keep.len() * 64 >= x.len(),
            "dropout mask of {} words for {} and {} elements",
            self.keep.len(),
            x.len(),
            y.len()
        );
        y.par_chunks_mut(MASK_CHUNK)
            .zip(x.par_chunks(MASK_CHUNK))
            .enumerate()
            .for_each(|(c, (y, x))| self.each_in_row(c * MASK_CHUNK, x, y, &put));
    }

    /// `put(y[j], x[j] · keep(start + j) · scale)` along a run of the masked input that starts
    /// at element `start`: 32 bits at a time where it starts on a 32-bit boundary, so that the
    /// loops vectorize (no index division or bounds check per element); one bit at a time
    /// otherwise.
    fn each_in_row<Y>(&self, start: usize, x: &[f32], y: &mut [Y], put: impl Fn(&mut Y, f32)) {
        assert!(
            x.len() == y.len() && self.keep.len() * 64 >= start + x.len(),
            "dropout mask of {} words for elements {start}..{}",
            self.keep.len(),
            start + x.len()
        );
        if start.is_multiple_of(32) {
            let halves = self.keep[start / 64..]
                .iter()
                .flat_map(|w| [*w as u32, (w >> 32) as u32])
                .skip(start / 32 % 2);
            for ((y, x), bits) in y.chunks_mut(32).zip(x.chunks(32)).zip(halves) {
                for (j, (y, x)) in y.iter_mut().zip(x).enumerate() {
                    put(y, x * ((bits >> j as u32 & 1) as f32 * self.scale));
                }
            }
        } else {
            for (j, (y, x)) in y.iter_mut().zip(x).enumerate() {
                let e = start + j;
                put(
                    y,
                    x * ((self.keep[e / 64] >> (e % 64) & 1) as f32 * self.scale),
                );
            }
        }
    }

    /// `out = x ⊙ mask · scale` for the row `x` of the masked input that starts at `start`.
    pub(super) fn row_into(&self, start: usize, x: &[f32], out: &mut [f32]) {
        self.each_in_row(start, x, out, |o, v| *o = v);
    }

    /// `dst += t ⊙ mask · scale` for the row that starts at `start`.
    pub(super) fn add_row(&self, start: usize, t: &[f32], dst: &mut [f32]) {
        self.each_in_row(start, t, dst, |d, v| *d += v);
    }

    /// The mask of some rows of a (rows × `width`) input: row `k` of the result is row
    /// `rows[k]` of this one.
    pub fn rows(&self, rows: &[usize], width: usize) -> DropMask {
        let mut keep = vec![0u64; (rows.len() * width).div_ceil(64)];
        for (k, &r) in rows.iter().enumerate() {
            for j in 0..width {
                let (src, dst) = (r * width + j, k * width + j);
                if self.keep[src / 64] >> (src % 64) & 1 == 1 {
                    keep[dst / 64] |= 1 << (dst % 64);
                }
            }
        }
        DropMask {
            keep: Arc::new(keep),
            scale: self.scale,
        }
    }
}

/// Draws a [`DropMask`] for `n` elements: one `f64` per element from `rng`, in order, dropped
/// when below `p`. ChaCha is counter-based, so chunks of the mask are drawn in parallel by
/// seeking to their word position; `rng` ends where the sequential draws would leave it.
///
/// rand's `Standard` f64 is `(next_u64() >> 11) · 2⁻⁵³`, and `u ≥ p` holds exactly when the
/// integer `next_u64() >> 11` is at least `⌈p · 2⁵³⌉` (`p · 2⁵³` is exact in f64): the draws
/// are compared as integers, 64 at a time from one `fill` of the stream (the same 32-bit words,
/// in order, that 64 `next_u64` calls return), into one word of the mask.
pub fn dropout_mask(n: usize, p: f64, rng: &mut rand_chacha::ChaCha8Rng) -> Result<DropMask> {
    use rand::Rng;
    let _span = times::span("dropout mask");
    if !(0.0..1.0).contains(&p) {
        bail!("dropout probability {p} outside [0, 1)");
    }
    let least = (p * (1u64 << 53) as f64).ceil() as u64;
    let base = rng.get_word_pos();
    let start = rng.clone();
    let mut keep = vec![0u64; n.div_ceil(64)];
    keep.par_chunks_mut(MASK_CHUNK / 64)
        .enumerate()
        .for_each(|(c, words)| {
            let mut r = start.clone();
            let e0 = c * MASK_CHUNK;
            // Each f64 draw is one next_u64: two 32-bit words.
            r.set_word_pos(base + 2 * e0 as u128);
            let mut draws = [0u64; 64];
            for (i, word) in words.iter_mut().enumerate() {
                let draws = &mut draws[..(n - e0 - 64 * i).min(64)];
                r.fill(draws);
                *word = draws
                    .iter()
                    .enumerate()
                    .fold(0, |w, (j, d)| w | u64::from(d >> 11 >= least) << j);
            }
        });
    rng.set_word_pos(base + 2 * n as u128);
    Ok(DropMask {
        keep: Arc::new(keep),
        scale: (1.0 / (1.0 - p)) as f32,
    })
}
