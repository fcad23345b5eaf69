//! The bf16 product with AVX512-BF16's `VDPBF16PS` (Zen 4, Cooper Lake and later): each 32×32
//! block of `C` as four 8×32 register blocks (16 accumulators), one pair row at a time: two
//! lines of `B` loaded, each row's pair of `A` broadcast, 16 pair dot products.

use super::BLOCK;
use std::arch::x86_64::*;

/// Can this CPU run the kernel?
pub(super) fn available() -> Result<(), String> {
    if std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        Ok(())
    } else {
        Err("this CPU lacks AVX512-BF16 (cpuid flag avx512_bf16)".into())
    }
}

/// See [`super::emulated::blocks`]; the caller has checked [`available`].
pub(super) fn blocks<'a>(
    a: &[u16],
    lda: usize,
    kq: usize,
    blocks: impl Iterator<Item = (usize, &'a [u16], &'a [u16])>,
    store: &mut impl FnMut(usize, &[f32; BLOCK * BLOCK]),
) {
    assert!(a.len() >= BLOCK * lda && lda >= 2 * kq);
    let mut c = [0f32; BLOCK * BLOCK];
    for (p, b0, b1) in blocks {
        assert!(b0.len() >= kq * 32 && b1.len() >= kq * 32);
        for sub in 0..BLOCK / 8 {
            // SAFETY: AVX512-BF16 is present (the kernel is chosen only where it is); the 8 rows
            // of `a` from row 8·sub hold 2·kq values each and the panels kq lines (asserted).
            unsafe {
                block8(
                    a.as_ptr().add(sub * 8 * lda),
                    lda,
                    b0.as_ptr(),
                    b1.as_ptr(),
                    kq,
                    c.as_mut_ptr().add(sub * 8 * BLOCK),
                )
            };
        }
        store(p, &c);
    }
}

/// Rows 0..8 of `a` (stride `lda`) times the panels `b0`, `b1` over `kq` pair rows → 8×32
/// values at `c` (row stride 32).
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block8(
    a: *const u16,
    lda: usize,
    b0: *const u16,
    b1: *const u16,
    kq: usize,
    c: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; 8];
    for q in 0..kq {
        let v0: __m512bh = std::mem::transmute(_mm512_load_si512(b0.add(q * 32).cast()));
        let v1: __m512bh = std::mem::transmute(_mm512_load_si512(b1.add(q * 32).cast()));
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = a.add(r * lda + 2 * q).cast::<i32>().read_unaligned();
            let va: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            acc[0] = _mm512_dpbf16_ps(acc[0], va, v0);
            acc[1] = _mm512_dpbf16_ps(acc[1], va, v1);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(r * BLOCK), acc[0]);
        _mm512_storeu_ps(c.add(r * BLOCK + 16), acc[1]);
    }
}

/// f32 → bf16 (round to nearest even), 16 at a time with `VCVTNEPS2BF16`: `src.len()` values
/// written at `dst`.
///
/// # Safety
/// AVX512-BF16 must be present, and `dst` valid for writes of `src.len()` values (which may
/// be uninitialised).
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn convert(src: &[f32], dst: *mut u16) {
    let n = src.len();
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_loadu_ps(src.as_ptr().add(i));
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(dst.add(i).cast(), h);
        i += 16;
    }
    for (j, &s) in src.iter().enumerate().skip(i) {
        dst.add(j).write(super::to_bf16(s));
    }
}
