//! The bf16 product on AMX tiles (`TDPBF16PS`; Intel Xeon Sapphire Rapids and later): each 32×32
//! block of `C` as 2×2 accumulator tiles of 16×16 f32 (tmm0-3), over steps of 32 k: two tiles of
//! `A` (16 rows × 32 values, read in place at the rows' stride, tmm4-5) and two of `B` (16 pair
//! rows of a panel, tmm6-7). `B`'s tiles are loaded with the T1 hint (`tileloaddt1`: cached in
//! L2, not L1), so that the task's 32 rows of `A`, which every one of its blocks reads again,
//! stay in L1 (measured at 1280 rows, 576 columns, k = 576: 1,940 → 2,440 GF/s; a SmolLM2 train
//! step's gate and up with SwiGLU from 145-158 to 131-132 ms). AMX has no stable intrinsics:
//! inline assembly. Linux hands out the
//! tile registers only after `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once
//! per process when the kernel is first checked; a kernel (or hypervisor) that refuses it leaves
//! the kernel unavailable.

use super::BLOCK;
use std::arch::asm;
use std::sync::OnceLock;

/// Can this CPU and OS run the kernel? (cpuid's AMX-TILE and AMX-BF16, then the permission.)
pub(super) fn available() -> Result<(), String> {
    static OK: OnceLock<Result<(), String>> = OnceLock::new();
    OK.get_or_init(|| {
        let l7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (tile, bf16) = (l7.edx & (1 << 24) != 0, l7.edx & (1 << 22) != 0);
        if !(tile && bf16) {
            return Err("this CPU lacks AMX-BF16 (cpuid flags amx_tile, amx_bf16)".into());
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if r != 0 {
            return Err(format!(
                "the OS refused the AMX tile registers (arch_prctl ARCH_REQ_XCOMP_PERM: {})",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    })
    .clone()
}

/// Palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut b = [0u8; 64];
    b[0] = 1;
    let mut t = 0;
    while t < 8 {
        b[16 + 2 * t] = 64;
        b[48 + t] = 16;
        t += 1;
    }
    TileConfig(b)
};

/// See [`super::emulated::blocks`]; the caller has checked [`available`]. The tiles are
/// configured at the start and released at the end (a thread holds AMX state only meanwhile).
pub(super) fn blocks<'a>(
    a: &[u16],
    lda: usize,
    kq: usize,
    blocks: impl Iterator<Item = (usize, &'a [u16], &'a [u16])>,
    store: &mut impl FnMut(usize, &[f32; BLOCK * BLOCK]),
) {
    // SAFETY: no block is stored directly.
    unsafe { blocks_direct(a, lda, kq, blocks, store, |_| None) }
}

/// [`blocks`], except that a block for which `direct(p)` gives `(pointer, row stride)` is
/// stored by the tiles straight there (32 rows of 32 f32 at that stride), without `store`:
/// no copy through a buffer.
///
/// # Safety
/// Each pointer `direct` gives must be valid for writes of 32 rows of 32 f32 at its row stride
/// and alias nothing in use.
pub(super) unsafe fn blocks_direct<'a>(
    a: &[u16],
    lda: usize,
    kq: usize,
    blocks: impl Iterator<Item = (usize, &'a [u16], &'a [u16])>,
    store: &mut impl FnMut(usize, &[f32; BLOCK * BLOCK]),
    direct: impl Fn(usize) -> Option<(*mut f32, usize)>,
) {
    assert!(a.len() >= BLOCK * lda && lda >= 2 * kq && kq.is_multiple_of(16));
    let steps = kq / 16;
    // SAFETY: AMX is available and permitted (checked by the kernel's choice); the config is
    // 64-byte aligned.
    unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack)) };
    // k in passes of at most MAX_STEPS steps, each over every block of the task; with more
    // than one, a block's sums wait in `acc` between them (stored and reloaded exactly: the
    // same values as one pass over k).
    let blocks: Vec<_> = blocks.collect();
    for (_, b0, b1) in &blocks {
        assert!(b0.len() >= kq * 32 && b1.len() >= kq * 32);
    }
    let passes = steps.div_ceil(MAX_STEPS);
    let chunk = steps.div_ceil(passes);
    let mut acc = vec![[0f32; BLOCK * BLOCK]; if passes == 1 { 1 } else { blocks.len() }];
    for s0 in (0..steps).step_by(chunk) {
        let s1 = (s0 + chunk).min(steps);
        for (i, &(p, b0, b1)) in blocks.iter().enumerate() {
            let c = &mut acc[if passes == 1 { 0 } else { i }];
            let to = if s1 == steps { direct(p) } else { None };
            let init = (s0 > 0).then_some(c.as_ptr());
            let (dst, row) = to.unwrap_or((c.as_mut_ptr(), BLOCK));
            // SAFETY: every tile load reads 16 rows of 64 bytes inside `a` (32 rows of `lda`
            // values, asserted) or inside a panel (kq lines, asserted) or the block `c`; the
            // stores write `c` or 32 rows of 32 values at `dst` (the caller's contract).
            unsafe {
                block(
                    a.as_ptr(),
                    lda * 2,
                    (b0.as_ptr(), b1.as_ptr()),
                    s0..s1,
                    init,
                    (dst, row * 4),
                )
            };
            if s1 == steps && to.is_none() {
                store(p, c);
            }
        }
    }
    // SAFETY: releases this thread's tile state.
    unsafe { asm!("tilerelease", options(nostack)) };
}

/// The most steps of 32 k one pass over a task's blocks takes: 32 rows of `A` over 576 k are
/// 36 KiB, which stay in L1 (48 KiB on Sapphire Rapids and later) while the panels of `B`
/// stream past from L2 without being cached in L1 (`tileloaddt1`); over more k the rows would
/// no longer fit, and every tile would come from L2 (measured at 1280 rows, 576 columns: k =
/// 576 at 2,440 GF/s; k = 1,152 in one pass 1,880, in two 2,100; k = 1,536 in one pass 1,690,
/// in three 1,980).
const MAX_STEPS: usize = 18;

/// One 32×32 block over `steps` (steps of 32 k), its sums started at zero or loaded from
/// `init` (a 32×32 block, rows 128 bytes apart), stored at `c` (rows `row` bytes apart).
#[inline(always)]
unsafe fn block(
    a: *const u16,
    stride: usize,
    (b0, b1): (*const u16, *const u16),
    steps: std::ops::Range<usize>,
    init: Option<*const f32>,
    (c, row): (*mut f32, usize),
) {
    match init {
        None => asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack)
        ),
        Some(i) => asm!(
            "tileloadd tmm0, [{c00} + {st}*1]",
            "tileloadd tmm1, [{c01} + {st}*1]",
            "tileloadd tmm2, [{c10} + {st}*1]",
            "tileloadd tmm3, [{c11} + {st}*1]",
            c00 = in(reg) i,
            c01 = in(reg) i.add(16),
            c10 = in(reg) i.add(16 * BLOCK),
            c11 = in(reg) i.add(16 * BLOCK + 16),
            st = in(reg) BLOCK * 4,
            options(nostack)
        ),
    }
    let a1 = a.byte_add(16 * stride);
    for s in steps {
        let (a0, a1) = (a.add(s * 32), a1.add(s * 32));
        let (b0, b1) = (b0.add(s * 16 * 32), b1.add(s * 16 * 32));
        // B's tiles with the T1 hint: into L2, not L1, where the rows of A stay.
        asm!(
            "tileloadd tmm4, [{a0} + {st}*1]",
            "tileloadd tmm5, [{a1} + {st}*1]",
            "tileloaddt1 tmm6, [{b0} + {sb}*1]",
            "tileloaddt1 tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0,
            a1 = in(reg) a1,
            b0 = in(reg) b0,
            b1 = in(reg) b1,
            st = in(reg) stride,
            sb = in(reg) 64usize,
            options(nostack)
        );
    }
    let c1 = c.byte_add(16 * row);
    asm!(
        "tilestored [{c00} + {st}*1], tmm0",
        "tilestored [{c01} + {st}*1], tmm1",
        "tilestored [{c10} + {st}*1], tmm2",
        "tilestored [{c11} + {st}*1], tmm3",
        c00 = in(reg) c,
        c01 = in(reg) c.add(16),
        c10 = in(reg) c1,
        c11 = in(reg) c1.add(16),
        st = in(reg) row,
        options(nostack)
    );
}
