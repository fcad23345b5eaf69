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
}
