//! f32 matrix products on the gemm crate, into caller buffers or fresh ones never zeroed first.

use super::*;

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)`, all f32, with explicit (row, column) strides.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    par: ::gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() > (m - 1) * dst_rs + (n - 1));
    // SAFETY: `dst` holds every element the product writes (checked above) and, being
    // `&mut`, overlaps neither operand.
    unsafe {
        gemm_into(
            (m, n, k),
            dst.as_mut_ptr(),
            dst_rs,
            accumulate,
            (lhs, lhs_strides),
            (rhs, rhs_strides),
            par,
        )
    }
}

/// `lhs (m×k) · rhs (k×n)` into a new (m×n) row-major buffer that is never zeroed first (a
/// zeroing pass costs as much as an element-wise op): the kernel, told not to read its
/// destination, writes every element before `set_len` exposes them.
pub(super) fn matmul_new(
    (m, n, k): (usize, usize, usize),
    lhs: (&[f32], (usize, usize)),
    rhs: (&[f32], (usize, usize)),
    par: ::gemm::Parallelism,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `dst` has room for the m×n product and is a fresh allocation; with
    // `accumulate == false` gemm only writes it, every element (k > 0), so all m×n are
    // initialised when the length is set.
    unsafe {
        gemm_into((m, n, k), dst.as_mut_ptr(), n, false, lhs, rhs, par);
        dst.set_len(m * n);
    }
    dst
}

/// The gemm call behind [`matmul`] and [`matmul_new`]; checks the operands' bounds.
///
/// # Safety
/// `dst` must be valid for writes (and for reads when `accumulate`) of the m×n product at row
/// stride `dst_rs`, and must not overlap `lhs` or `rhs`.
unsafe fn gemm_into(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (lhs, (lhs_rs, lhs_cs)): (&[f32], (usize, usize)),
    (rhs, (rhs_rs, rhs_cs)): (&[f32], (usize, usize)),
    par: ::gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // The last element each operand touches must be inside its slice.
    if k > 0 {
        assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
        assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    }
    ::gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.as_ptr(),
        lhs_cs as isize,
        lhs_rs as isize,
        rhs.as_ptr(),
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    )
}

/// This machine's f32 matmul rate in GFLOP/s, measured with the kernel and thread pool that
/// [`linear`] uses, on a projection's shapes: `x (m×k) · Wᵀ` with `W` stored (n, k), as the
/// forward pass runs it, and `g (m×n) · W` as the backward pass does; the mean of both, best
/// of `reps` runs each. It is the ceiling for an f32 engine on this CPU: the
/// benchmark reports each path's FLOP rate next to it.
pub fn gemm_gflops(m: usize, n: usize, k: usize, reps: usize) -> f64 {
    let x: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i % 5) as f32 - 2.0) * 0.01).collect();
    let g: Vec<f32> = (0..m * n).map(|i| ((i % 3) as f32 - 1.0) * 0.01).collect();
    let mut y = vec![0f32; m * n];
    let mut dx = vec![0f32; m * k];
    let flop = 2.0 * (m * n * k) as f64;
    let mut best = [f64::INFINITY; 2];
    for _ in 0..reps.max(1) + 1 {
        let t = std::time::Instant::now();
        matmul(
            m,
            n,
            k,
            &mut y,
            n,
            false,
            &x,
            (k, 1),
            &w,
            (1, k),
            pool_parallelism(),
        );
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        matmul(
            m,
            k,
            n,
            &mut dx,
            k,
            false,
            &g,
            (n, 1),
            &w,
            (k, 1),
            pool_parallelism(),
        );
        best[1] = best[1].min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box((&y, &dx));
    (flop / best[0] + flop / best[1]) / 2.0 / 1e9
}

/// `rows` rows of `cols` values, row `i` at `src[i·ld..]`, transposed (cols×rows, row major):
/// as the right-hand side of a small product (attention's `· Kᵀ` and `· Vᵀ`), the gemm crate
/// runs about twice as fast as on the matrix read transposed in place (measured at T = 160,
/// hd = 64: 166 against 91 GF/s on one core); a LoRA factor's rows.
pub(super) fn transpose(src: &[f32], rows: usize, cols: usize, ld: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for i in 0..rows {
        for (j, v) in src[i * ld..i * ld + cols].iter().enumerate() {
            t[j * rows + i] = *v;
        }
    }
    t
}
