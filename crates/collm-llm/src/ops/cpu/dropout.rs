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
        if width.is_multiple_of(64) {
            // Whole words (every row starts on a word: a projection's input of 576 or 1,536).
            let w = width / 64;
            for (k, &r) in rows.iter().enumerate() {
                keep[k * w..(k + 1) * w].copy_from_slice(&self.keep[r * w..(r + 1) * w]);
            }
            return DropMask {
                keep: Arc::new(keep),
                scale: self.scale,
            };
        }
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
    // From an even word position with AVX-512: the keystream 16 blocks at a time, compared in
    // place; else through rand_chacha's own draws.
    let wide = base.is_multiple_of(2) && chacha16::available();
    let (key, stream) = (start.get_seed(), start.get_stream());
    keep.par_chunks_mut(MASK_CHUNK / 64)
        .enumerate()
        .for_each(|(c, words)| {
            let e0 = c * MASK_CHUNK;
            // Each f64 draw is one next_u64: two 32-bit words.
            let pos = base + 2 * e0 as u128;
            if wide {
                // SAFETY: AVX-512F and BMI2 are present (checked).
                unsafe { chacha16::keep_bits(&key, stream, pos, least, n - e0, words) };
                return;
            }
            let mut r = start.clone();
            r.set_word_pos(pos);
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

/// rand_chacha's ChaCha8 keystream 16 blocks at a time on AVX-512 (one block per 32-bit
/// lane), for the dropout masks: rand_chacha 0.3 draws 4 blocks at a time with AVX2 and copies
/// them out word by word, which made the masks 6% of a LoRA train step. Written by hand: no
/// crate generates this stream on AVX-512. The state is rand_chacha's: the constants, the
/// seed as 8 little-endian words, the 64-bit block counter in words 12-13 and the stream in
/// 14-15; 4 double rounds; each output word the round's word plus the input's. Tested
/// against rand_chacha's own draws.
mod chacha16 {
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("bmi2")
    }

    /// The 16 blocks from block `block0` of the stream: output word `i` of block `block0 + j`
    /// in lane `j` of `x[i]`.
    #[target_feature(enable = "avx512f")]
    unsafe fn blocks(key: &[u32; 8], stream: u64, block0: u64) -> [__m512i; 16] {
        let splat = |v: u32| _mm512_set1_epi32(v as i32);
        let mut s = [_mm512_setzero_si512(); 16];
        for (s, c) in s
            .iter_mut()
            .zip([0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574])
        {
            *s = splat(c);
        }
        for (s, k) in s[4..12].iter_mut().zip(key) {
            *s = splat(*k);
        }
        let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        let lo0 = splat(block0 as u32);
        let lo = _mm512_add_epi32(lo0, lanes);
        // The counter is 64-bit: a lane whose low word wrapped carries into the high one.
        let carry = _mm512_cmplt_epu32_mask(lo, lo0);
        let hi0 = splat((block0 >> 32) as u32);
        s[12] = lo;
        s[13] = _mm512_mask_add_epi32(hi0, carry, hi0, splat(1));
        s[14] = splat(stream as u32);
        s[15] = splat((stream >> 32) as u32);
        let mut x = s;
        macro_rules! qr {
            ($a:expr, $b:expr, $c:expr, $d:expr) => {
                x[$a] = _mm512_add_epi32(x[$a], x[$b]);
                x[$d] = _mm512_rol_epi32(_mm512_xor_si512(x[$d], x[$a]), 16);
                x[$c] = _mm512_add_epi32(x[$c], x[$d]);
                x[$b] = _mm512_rol_epi32(_mm512_xor_si512(x[$b], x[$c]), 12);
                x[$a] = _mm512_add_epi32(x[$a], x[$b]);
                x[$d] = _mm512_rol_epi32(_mm512_xor_si512(x[$d], x[$a]), 8);
                x[$c] = _mm512_add_epi32(x[$c], x[$d]);
                x[$b] = _mm512_rol_epi32(_mm512_xor_si512(x[$b], x[$c]), 7);
            };
        }
        for _ in 0..4 {
            qr!(0, 4, 8, 12);
            qr!(1, 5, 9, 13);
            qr!(2, 6, 10, 14);
            qr!(3, 7, 11, 15);
            qr!(0, 5, 10, 15);
            qr!(1, 6, 11, 12);
            qr!(2, 7, 8, 13);
            qr!(3, 4, 9, 14);
        }
        for (x, s) in x.iter_mut().zip(&s) {
            *x = _mm512_add_epi32(*x, *s);
        }
        x
    }

    /// The keep bits of the 128 draws of 16 blocks from `block0`: draw `8j + k` is the `k`-th
    /// 64-bit word of block `j` (its words `2k`, `2k + 1`, low first), kept when its top 53 bits
    /// are at least `least`; bit `8j + k` of (low, high).
    #[target_feature(enable = "avx512f,bmi2")]
    unsafe fn group(key: &[u32; 8], stream: u64, block0: u64, least: u64) -> [u64; 2] {
        let x = blocks(key, stream, block0);
        // Lanes 0-7 and 8-15 of two word vectors interleaved into 64-bit lanes.
        let first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        let second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        let least = _mm512_set1_epi64(least as i64);
        let mut out = [0u64; 2];
        for k in 0..8 {
            let (lo, hi) = (x[2 * k], x[2 * k + 1]);
            let a = _mm512_permutex2var_epi32(lo, first, hi);
            let b = _mm512_permutex2var_epi32(lo, second, hi);
            let ka = _mm512_cmpge_epu64_mask(_mm512_srli_epi64(a, 11), least) as u64;
            let kb = _mm512_cmpge_epu64_mask(_mm512_srli_epi64(b, 11), least) as u64;
            let spread = 0x0101_0101_0101_0101u64 << k;
            out[0] |= _pdep_u64(ka, spread);
            out[1] |= _pdep_u64(kb, spread);
        }
        out
    }

    /// The keep bits of draws from word position `pos` (even) of the stream on, one per
    /// element, into `words` (64 per word, the first `n` at most; bits past `n` zero).
    ///
    /// # Safety
    /// The CPU has AVX-512F and BMI2 ([`available`]).
    #[target_feature(enable = "avx512f,bmi2")]
    pub(super) unsafe fn keep_bits(
        seed: &[u8; 32],
        stream: u64,
        pos: u128,
        least: u64,
        n: usize,
        words: &mut [u64],
    ) {
        debug_assert!(pos.is_multiple_of(2));
        let mut key = [0u32; 8];
        for (k, b) in key.iter_mut().zip(seed.chunks_exact(4)) {
            *k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        let draws = n.min(64 * words.len());
        // Draws counted from the start of the first group's first block; the first `skip` of
        // them come before `pos`.
        let block0 = (pos / 16) as u64;
        let skip = (pos % 16) as usize / 2;
        let groups = (skip + draws).div_ceil(128);
        let mut bits = vec![0u64; 2 * groups + 1];
        for g in 0..groups {
            let [lo, hi] = group(&key, stream, block0.wrapping_add(16 * g as u64), least);
            bits[2 * g] = lo;
            bits[2 * g + 1] = hi;
        }
        for (i, w) in words.iter_mut().enumerate().take(draws.div_ceil(64)) {
            let at = skip + 64 * i;
            let (q, r) = (at / 64, at % 64);
            let mut v = bits[q] >> r;
            if r > 0 {
                v |= bits[q + 1] << (64 - r);
            }
            let left = draws - 64 * i;
            if left < 64 {
                v &= (1u64 << left) - 1;
            }
            *w = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Element `e` of a mask: kept or not.
    fn kept(m: &DropMask, e: usize) -> bool {
        m.keep[e / 64] >> (e % 64) & 1 == 1
    }

    #[test]
    fn a_masks_rows_are_its_own_draws_at_those_rows_in_whole_words_and_not() {
        // 128 wide: the word path; 100 wide: element by element. Rows in any order, repeated.
        for width in [128, 100, 64, 3] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
            let m = dropout_mask(11 * width, 0.3, &mut rng).unwrap();
            let rows = [0, 3, 4, 10, 7, 3];
            let r = m.rows(&rows, width);
            assert_eq!(r.scale, m.scale);
            let mut dropped = 0;
            for (k, &row) in rows.iter().enumerate() {
                for j in 0..width {
                    assert_eq!(kept(&r, k * width + j), kept(&m, row * width + j));
                    dropped += usize::from(!kept(&m, row * width + j));
                }
            }
            assert!(dropped > 0 && dropped < rows.len() * width, "{width}");
            // Nothing kept past the rows.
            for e in rows.len() * width..r.keep.len() * 64 {
                assert!(!kept(&r, e), "{width}: {e}");
            }
        }
    }
}
