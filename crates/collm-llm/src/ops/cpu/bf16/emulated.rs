//! The bf16 product in portable code, on the same packing as the native kernels: each 32×32
//! block of `C` accumulated in f32 over the pair rows, the odd product of a pair added first and
//! then the even one, as `VDPBF16PS` does (a product of two bf16 values is exact in f32). What
//! the native kernels are tested against; runs on every CPU.

use super::{from_bf16, BLOCK};

/// Computes each block of `blocks` (panel pair, its two panels) for the 32 rows `a` (row stride
/// `lda` values) over `kq` pair rows, handing it to `store`.
pub(super) fn blocks<'a>(
    a: &[u16],
    lda: usize,
    kq: usize,
    blocks: impl Iterator<Item = (usize, &'a [u16], &'a [u16])>,
    store: &mut impl FnMut(usize, &[f32; BLOCK * BLOCK]),
) {
    let mut c = [0f32; BLOCK * BLOCK];
    for (p, b0, b1) in blocks {
        c.fill(0.0);
        for r in 0..BLOCK {
            let row = &a[r * lda..];
            let acc = &mut c[r * BLOCK..(r + 1) * BLOCK];
            for q in 0..kq {
                let (a0, a1) = (from_bf16(row[2 * q]), from_bf16(row[2 * q + 1]));
                for (half, b) in [b0, b1].into_iter().enumerate() {
                    let line = &b[q * 32..(q + 1) * 32];
                    for col in 0..16 {
                        let v = &mut acc[half * 16 + col];
                        *v += a1 * from_bf16(line[2 * col + 1]);
                        *v += a0 * from_bf16(line[2 * col]);
                    }
                }
            }
        }
        store(p, &c);
    }
}
