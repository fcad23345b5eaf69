//! Reductions over slices in 8 lanes by position (`j mod 8`), the lanes combined in order at
//! the end: loops that vectorize (a plain sum in order does not: f32 addition is not
//! reassociated). Each function spells the loop out for its own operands rather than sharing a
//! generic one: these are the inner loops of the fused ops, and the plain form is what LLVM
//! reliably vectorizes.

/// The sum of `v`: the same value for a row however many zeros trail it.
#[inline]
pub(super) fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    for (a, x) in acc.iter_mut().zip(rest) {
        *a += x;
    }
    acc.iter().sum()
}

/// The largest of `v` (−∞ for none), in 8 lanes (the maximum does not depend on the order).
#[inline]
pub(super) fn lane_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    for (a, &x) in acc.iter_mut().zip(rest) {
        *a = if x > *a { x } else { *a };
    }
    acc.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x))
}

/// `Σ a·b·c` over the shortest of the three, summed as [`lane_sum`].
#[inline]
pub(super) fn lane_dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for (((s, x), y), z) in acc.iter_mut().zip(x).zip(y).zip(z) {
            *s += x * y * z;
        }
    }
    for (((s, x), y), z) in acc.iter_mut().zip(ra).zip(rb).zip(rc) {
        *s += x * y * z;
    }
    acc.iter().sum()
}

/// The dot product of `a` and `b` (the shorter's length), summed as [`lane_sum`].
#[inline]
pub(super) fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    for ((s, x), y) in acc.iter_mut().zip(ra).zip(rb) {
        *s += x * y;
    }
    acc.iter().sum()
}

/// [`lane_dot`] of `a` with each of `bs` (each at least as long as `a`), the `N` sums carried
/// together in one pass over `a`: `N` independent chains of adds where one [`lane_dot`] waits on
/// its one chain's latency. Each result is the value `lane_dot(a, b)` gives.
#[inline]
pub(super) fn lane_dots<const N: usize>(a: &[f32], bs: [&[f32]; N]) -> [f32; N] {
    let n = a.len();
    let bs = bs.map(|b| &b[..n]);
    let mut acc = [[0f32; 8]; N];
    let full = n / 8 * 8;
    for j in (0..full).step_by(8) {
        let x = &a[j..j + 8];
        for (acc, b) in acc.iter_mut().zip(&bs) {
            for ((s, x), y) in acc.iter_mut().zip(x).zip(&b[j..j + 8]) {
                *s += x * y;
            }
        }
    }
    for (acc, b) in acc.iter_mut().zip(&bs) {
        for ((s, x), y) in acc.iter_mut().zip(&a[full..]).zip(&b[full..]) {
            *s += x * y;
        }
    }
    acc.map(|acc| acc.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_reductions_match_f64_sums_on_every_ragged_length() {
        let v = |n: usize, k: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32 + k) * 0.37).sin()).collect()
        };
        for n in 0..41 {
            let (a, b, c) = (v(n, 1.0), v(n, 2.0), v(n, 3.0));
            let dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let dot3: f64 = (0..n)
                .map(|i| a[i] as f64 * b[i] as f64 * c[i] as f64)
                .sum();
            let sum: f64 = a.iter().map(|x| *x as f64).sum();
            assert!((lane_dot(&a, &b) as f64 - dot).abs() < 1e-5, "dot, n = {n}");
            assert!(
                (lane_dot3(&a, &b, &c) as f64 - dot3).abs() < 1e-5,
                "dot3, n = {n}"
            );
            assert!((lane_sum(&a) as f64 - sum).abs() < 1e-5, "sum, n = {n}");
            let max = a.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(lane_max(&a), max, "max, n = {n}");
        }
        // The shorter operand sets the length.
        assert_eq!(lane_dot(&[1.0, 2.0, 3.0], &[4.0]), 4.0);
    }

    #[test]
    fn lane_dots_are_each_lane_dot_bit_for_bit() {
        let v = |n: usize, k: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32 + k) * 0.37).sin()).collect()
        };
        for n in [0, 1, 7, 8, 9, 40, 576] {
            let a = v(n, 0.5);
            let bs: Vec<Vec<f32>> = (0..4).map(|k| v(n + k, k as f32 + 2.0)).collect();
            let got = lane_dots(&a, [&bs[0], &bs[1], &bs[2], &bs[3]]);
            for (k, b) in bs.iter().enumerate() {
                assert_eq!(
                    got[k].to_bits(),
                    lane_dot(&a, b).to_bits(),
                    "n = {n}, k = {k}"
                );
            }
        }
    }
}
