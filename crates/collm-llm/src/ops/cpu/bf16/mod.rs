//! The frozen projections in bf16 where the CPU multiplies bf16 natively: AMX on Intel Xeon
//! (Sapphire Rapids and later), AVX512-BF16 (Zen 4, Cooper Lake and later), f32 everywhere
//! else. Written by hand: no crate fits (the `gemm` crate has no bf16 kernel and converts f16 to
//! f32 while packing; candle's CPU matmul rejects bf16; `gemmkit` 0.1.2 multiplies bf16 into a
//! bf16 output, and has no AMX).
//!
//! One product, `C (m×n, f32) [+]= A (m×k) · B (k×n)`, with
//! - `A` the activations, f32 as the ops hold them: rounded to bf16 (round to nearest even) 32
//!   rows at a time inside each task, into a thread's own buffer (row major, `k` padded to 32
//!   with zeros), where they stay in L1 while every panel of `B` passes;
//! - `B` a frozen weight ([`Panels`]), packed once at load: panels of 16 columns, each a run of
//!   64-byte lines holding the pair rows `(B[2q][c], B[2q+1][c])` for its 16 columns `c` (the
//!   layout both `VDPBF16PS` and AMX's `TDPBF16PS` multiply: the pair dot product along k);
//! - the products accumulated in f32 by the hardware; `C` written (or added to) in f32.
//!
//! A projection `y = x Wᵀ` has `B = Wᵀ`, its backward pass `dx = dy W` has `B = W`: a
//! [`Bf16Weight`] keeps the first packing from load and makes the second when a backward pass
//! first needs it (scoring never does). Work is split into 32×32 blocks of `C` on rayon's pool;
//! each kernel computes a block: [`amx`] as 2×2 tiles, [`avx512`] as four 8×32 register blocks,
//! [`emulated`] with the same packing in portable f32 arithmetic (what the native kernels are
//! tested against, and what CI on an AVX2-only CPU runs to test the packing and the maths).

mod amx;
mod avx512;
mod emulated;

use rayon::prelude::*;
use std::sync::OnceLock;

/// Which kernel multiplies the frozen projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// f32 products on the `gemm` crate (every CPU).
    F32,
    /// bf16 products with `VDPBF16PS` (AVX512-BF16).
    Avx512Bf16,
    /// bf16 products on AMX tiles (`TDPBF16PS`).
    AmxBf16,
    /// The bf16 packing and maths in portable code: for tests on any CPU (slow).
    Emulated,
}

impl Kernel {
    /// The name `COLLM_KERNEL` takes and logs show.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::F32 => "f32",
            Kernel::Avx512Bf16 => "bf16",
            Kernel::AmxBf16 => "amx",
            Kernel::Emulated => "emulated",
        }
    }

    /// Does this kernel multiply in bf16 (the weights packed, the activations rounded)?
    pub fn is_bf16(self) -> bool {
        self != Kernel::F32
    }

    /// Can this CPU (and OS) run it? `Err` names what is missing.
    pub fn available(self) -> Result<(), String> {
        match self {
            Kernel::F32 | Kernel::Emulated => Ok(()),
            Kernel::Avx512Bf16 => avx512::available(),
            Kernel::AmxBf16 => amx::available(),
        }
    }

    /// The fastest kernel this CPU runs natively: AMX; else AVX512-BF16 on AMD (Zen 4 and later
    /// run `VDPBF16PS` at twice f32's multiply-add rate); else f32. Intel CPUs run `VDPBF16PS`
    /// at half their f32 FMA rate (measured on a Sapphire Rapids-class Xeon: the bf16 kernel at
    /// 0.6x the f32 one), so without AMX they stay f32.
    pub fn best() -> Kernel {
        if Kernel::AmxBf16.available().is_ok() {
            Kernel::AmxBf16
        } else if Kernel::Avx512Bf16.available().is_ok() && amd() {
            Kernel::Avx512Bf16
        } else {
            Kernel::F32
        }
    }
}

/// Is this an AMD CPU? (cpuid's vendor string.)
fn amd() -> bool {
    let v = std::arch::x86_64::__cpuid(0);
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&v.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&v.edx.to_le_bytes());
    id[8..].copy_from_slice(&v.ecx.to_le_bytes());
    &id == b"AuthenticAMD"
}

/// The process's choice of kernel: which one, and from which size on a projection uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelChoice {
    pub kernel: Kernel,
    /// A projection whose input or output is narrower than this stays in f32: for a small
    /// matrix the packing costs more than the faster products save. 0 under an explicit choice.
    pub min_dim: usize,
    /// Chosen by `auto` (rather than named in `COLLM_KERNEL`).
    pub auto: bool,
}

/// The narrowest projection `auto` multiplies in bf16 (SmolLM2-135M's narrowest is 192 wide;
/// the tests' tiny models, at most 64, stay in f32).
pub const AUTO_MIN_DIM: usize = 128;

impl KernelChoice {
    /// Every projection with `kernel`.
    pub fn all(kernel: Kernel) -> Self {
        Self {
            kernel,
            min_dim: 0,
            auto: false,
        }
    }

    /// The kernel a weight of (`out`, `in`) is multiplied with.
    pub fn for_weight(self, out: usize, inp: usize) -> Kernel {
        if out.min(inp) >= self.min_dim {
            self.kernel
        } else {
            Kernel::F32
        }
    }

    /// `auto`, `f32`, `bf16` (AVX512-BF16), `amx` (AMX-BF16) or `emulated`; a kernel this CPU
    /// cannot run is an error naming the missing feature.
    pub fn parse(name: &str) -> Result<Self, String> {
        let kernel = match name.trim() {
            "auto" | "" => {
                let kernel = Kernel::best();
                return Ok(Self {
                    kernel,
                    min_dim: AUTO_MIN_DIM,
                    auto: true,
                });
            }
            "f32" => Kernel::F32,
            "bf16" | "avx512bf16" | "avx512-bf16" => Kernel::Avx512Bf16,
            "amx" | "amx-bf16" => Kernel::AmxBf16,
            "emulated" => Kernel::Emulated,
            other => {
                return Err(format!(
                    "COLLM_KERNEL={other}: expected auto, f32, bf16 (AVX512-BF16), amx (AMX-BF16) or emulated"
                ))
            }
        };
        kernel
            .available()
            .map_err(|why| format!("COLLM_KERNEL={name}: {why}"))?;
        Ok(Self::all(kernel))
    }

    /// What a log line says: `amx (auto)`, `bf16 (COLLM_KERNEL)`.
    pub fn describe(self) -> String {
        let how = if self.auto { "auto" } else { "COLLM_KERNEL" };
        match self.kernel {
            Kernel::F32 => format!("f32 ({how})"),
            k if self.min_dim > 0 => format!(
                "{} ({how}; projections narrower than {} in f32)",
                k.name(),
                self.min_dim
            ),
            k => format!("{} ({how})", k.name()),
        }
    }
}

/// The process's kernel, chosen once at first use: `COLLM_KERNEL` if set, else `auto`.
pub fn kernel_choice() -> Result<KernelChoice, String> {
    static CHOICE: OnceLock<Result<KernelChoice, String>> = OnceLock::new();
    CHOICE
        .get_or_init(|| KernelChoice::parse(&std::env::var("COLLM_KERNEL").unwrap_or_default()))
        .clone()
}

/// 32 bf16 values: one 64-byte cache line, the unit every packed buffer is made of (aligned
/// for the vector loads and AMX's tile rows).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

const ZERO: Line = Line([0; 32]);

fn as_u16(lines: &[Line]) -> &[u16] {
    // SAFETY: a `Line` is 32 `u16`s with no padding (64 bytes, repr(C)).
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 32) }
}

fn as_u16_mut(lines: &mut [Line]) -> &mut [u16] {
    // SAFETY: as in `as_u16`, and the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), lines.len() * 32) }
}

/// f32 → bf16, round to nearest even (NaN stays NaN).
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

#[inline]
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// The rows of `C`'s blocks, and of `A`'s padding.
pub const BLOCK: usize = 32;

/// f32 → bf16 element-wise (the CPU's own conversion where it has one), the shorter's length.
pub(crate) fn convert(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    // SAFETY: `dst` holds n values.
    unsafe { convert_to(&src[..n], dst.as_mut_ptr()) }
}

/// [`convert`] into `src.len()` values at `dst`, which may be uninitialised (an epilogue's
/// output as it is made).
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` values.
pub(crate) unsafe fn convert_to(src: &[f32], dst: *mut u16) {
    if avx512::available().is_ok() {
        // SAFETY: AVX512-BF16 is present (checked); `dst` as the caller's contract says.
        unsafe { avx512::convert(src, dst) }
    } else {
        for (j, &s) in src.iter().enumerate() {
            // SAFETY: j < src.len() (the caller's contract).
            unsafe { dst.add(j).write(to_bf16(s)) };
        }
    }
}

/// The first `rows` × `cols` of a 32×32 block (rows 32 apart) in bf16 at `dst`, rows `ld`
/// apart: [`convert_to`] row by row, the CPU checked once per block (an epilogue's output).
///
/// # Safety
/// `dst` must be valid for writes of `rows` rows of `cols` values at row stride `ld`.
pub(crate) unsafe fn convert_rows(
    src: &[f32; BLOCK * BLOCK],
    rows: usize,
    cols: usize,
    dst: *mut u16,
    ld: usize,
) {
    let rows = rows.min(BLOCK);
    let cols = cols.min(BLOCK);
    if avx512::available().is_ok() {
        for r in 0..rows {
            // SAFETY: AVX512-BF16 is present (checked); row r of `dst` as the caller's
            // contract says.
            unsafe { avx512::convert(&src[r * BLOCK..r * BLOCK + cols], dst.add(r * ld)) }
        }
    } else {
        for r in 0..rows {
            // SAFETY: as the caller's contract says.
            unsafe { convert_to(&src[r * BLOCK..r * BLOCK + cols], dst.add(r * ld)) }
        }
    }
}

/// The `B` operand (k×n) in panels of 16 columns: panel `p`, pair row `q` is one line holding
/// `(B[2q][16p + c], B[2q + 1][16p + c])` for c in 0..16; `k` padded to 32 and the panels to an
/// even number with zeros.
pub struct Panels {
    data: Vec<Line>,
    k: usize,
    n: usize,
    /// Pair rows per panel (`k` padded to 32, over 2).
    kq: usize,
    /// Panels (an even number).
    np: usize,
}

impl Panels {
    /// `B[i][j] = get(i, j)` for i < k, j < n, rounded to bf16.
    pub fn pack(k: usize, n: usize, get: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let (kq, np, mut data) = Self::zeroed(k, n);
        let fill = |(p, panel): (usize, &mut [Line])| {
            for (q, line) in panel.iter_mut().enumerate() {
                for c in 0..16 {
                    let j = p * 16 + c;
                    if j >= n {
                        break;
                    }
                    for h in 0..2 {
                        let i = 2 * q + h;
                        if i < k {
                            line.0[2 * c + h] = to_bf16(get(i, j));
                        }
                    }
                }
            }
        };
        // A weight in parallel; a head's keys or values (inside attention's own parallel
        // loop) on the calling thread.
        if data.len() >= 4096 {
            data.par_chunks_mut(kq).enumerate().for_each(fill);
        } else {
            data.chunks_mut(kq).enumerate().for_each(fill);
        }
        Self { data, k, n, kq, np }
    }

    /// Room for `B` (k×n): (pair rows per panel, panels), and the zeroed lines.
    fn zeroed(k: usize, n: usize) -> (usize, usize, Vec<Line>) {
        let kq = k.div_ceil(32).max(1) * 16;
        let np = n.div_ceil(2 * 16).max(1) * 2;
        (kq, np, vec![ZERO; np * kq])
    }

    /// `B = src` (k×n, row `i` at `src[i·ld..]`), rounded to bf16: each pair of rows converted
    /// whole ([`convert`]), then interleaved into the lines. On the calling thread (for the
    /// per-head operands inside attention's parallel loops).
    pub fn from_rows(src: &[f32], k: usize, n: usize, ld: usize) -> Self {
        let (kq, np, mut data) = Self::zeroed(k, n);
        let mut rows = vec![0u16; 2 * np * 16];
        let (r0, r1) = rows.split_at_mut(np * 16);
        for q in 0..k.div_ceil(2) {
            convert(&src[2 * q * ld..2 * q * ld + n], &mut r0[..n]);
            if 2 * q + 1 < k {
                convert(&src[(2 * q + 1) * ld..(2 * q + 1) * ld + n], &mut r1[..n]);
            } else {
                r1.fill(0);
            }
            for (p, (a, b)) in r0.chunks_exact(16).zip(r1.chunks_exact(16)).enumerate() {
                let line = &mut data[p * kq + q].0;
                for (c, (&a, &b)) in a.iter().zip(b).enumerate() {
                    line[2 * c] = a;
                    line[2 * c + 1] = b;
                }
            }
        }
        Self { data, k, n, kq, np }
    }

    /// `B = srcᵀ` for `src` (n×k, row `j` at `src[j·ld..]`), rounded to bf16: each row of
    /// `src` converted whole, its pairs `(src[j][2q], src[j][2q + 1])` being column `j`'s
    /// entries of the lines. On the calling thread, as [`Panels::from_rows`].
    pub fn from_cols(src: &[f32], k: usize, n: usize, ld: usize) -> Self {
        let (kq, np, mut data) = Self::zeroed(k, n);
        let mut row = vec![0u16; 2 * kq];
        for j in 0..n {
            convert(&src[j * ld..j * ld + k], &mut row[..k]);
            let (p, c) = (j / 16, j % 16);
            for (line, pair) in data[p * kq..(p + 1) * kq]
                .iter_mut()
                .zip(row.chunks_exact(2))
            {
                line.0[2 * c] = pair[0];
                line.0[2 * c + 1] = pair[1];
            }
        }
        Self { data, k, n, kq, np }
    }

    /// `Wᵀ` for a weight `w` (out × in, row major): the forward product `x Wᵀ` (k = in), packed in
    /// parallel (at load; [`Panels::from_cols`] is the same packing on one thread, and
    /// [`Panels::from_rows`] gives `W` itself).
    pub fn transposed(w: &[f32], out: usize, inp: usize) -> Self {
        Self::pack(inp, out, |i, j| w[j * inp + i])
    }

    /// Value B[i][j], for tests and for rebuilding the f32 weight.
    pub fn get(&self, i: usize, j: usize) -> f32 {
        let (p, c) = (j / 16, j % 16);
        let line = &self.data[p * self.kq + i / 2];
        from_bf16(line.0[2 * c + i % 2])
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 64
    }

    /// Panel `p`'s lines.
    fn panel(&self, p: usize) -> &[u16] {
        as_u16(&self.data[p * self.kq..(p + 1) * self.kq])
    }
}

/// A frozen projection's weight (out × in) packed for the bf16 kernels: `Wᵀ` for the forward
/// product from load, `W` for the backward product from the first backward pass on.
pub struct Bf16Weight {
    fwd: Panels,
    bwd: OnceLock<Panels>,
}

impl Bf16Weight {
    /// Packs `w` (out × in, row major).
    pub fn new(w: &[f32], out: usize, inp: usize) -> Self {
        Self {
            fwd: Panels::transposed(w, out, inp),
            bwd: OnceLock::new(),
        }
    }

    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        (self.fwd.n, self.fwd.k)
    }

    /// `Wᵀ` (in × out).
    pub fn fwd(&self) -> &Panels {
        &self.fwd
    }

    /// `W` (out × in), packed from the forward packing on first use (the same bf16 values).
    pub fn bwd(&self) -> &Panels {
        self.bwd.get_or_init(|| {
            let (out, inp) = self.dims();
            Panels::pack(out, inp, |i, j| self.fwd.get(j, i))
        })
    }

    /// The weight as f32 (its bf16 values), out × in row major: what the composed ops read.
    pub fn to_f32(&self) -> Vec<f32> {
        let (out, inp) = self.dims();
        let mut w = vec![0f32; out * inp];
        w.par_chunks_mut(inp).enumerate().for_each(|(o, row)| {
            for (i, v) in row.iter_mut().enumerate() {
                *v = self.fwd.get(i, o);
            }
        });
        w
    }

    /// Bytes held (both packings once made).
    pub fn bytes(&self) -> usize {
        self.fwd.bytes() + self.bwd.get().map_or(0, Panels::bytes)
    }
}

/// A raw pointer into an output that the tasks of one product share (`C`, or what an
/// epilogue makes of its blocks): each writes its own blocks.
pub(crate) struct Out<T = f32>(pub(crate) *mut T);

impl<T> Clone for Out<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Out<T> {}

impl<T> Out<T> {
    /// The pointer `i` elements on (a method, so that closures capture the whole `Out`).
    ///
    /// # Safety
    /// As `pointer::add`: `i` inside the allocation.
    pub(crate) unsafe fn at(self, i: usize) -> *mut T {
        self.0.add(i)
    }
}
// SAFETY: the tasks write disjoint blocks (see `run` and the epilogues' callers).
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

/// Activations already in bf16, laid out as the kernels read `A` (rows of `k` values padded
/// with zeros to a multiple of 32, rows padded to a multiple of 32): made by an op's epilogue
/// where a value is computed (the MLP's activation, its gradients through SwiGLU), so that
/// the next product neither reads f32 nor converts it (and half the bytes are written).
pub(crate) struct Bf16Rows {
    data: Vec<Line>,
    m: usize,
    k: usize,
    kl: usize,
}

impl Bf16Rows {
    /// `m × k` values written by `fill`, which gets a pointer to row 0 and the row stride (in
    /// values): value (i, j) at `i·stride + j`. The padding is zeroed here.
    ///
    /// # Safety
    /// `fill` must write every value (i, j) with i < m, j < k (and nothing past them).
    pub(crate) unsafe fn build(m: usize, k: usize, fill: impl FnOnce(Out<u16>, usize)) -> Self {
        let kl = k.div_ceil(32).max(1);
        let rows = m.div_ceil(BLOCK).max(1) * BLOCK;
        let lda = kl * 32;
        let mut data: Vec<Line> = Vec::with_capacity(rows * kl);
        let base: *mut u16 = data.as_mut_ptr().cast();
        // SAFETY: inside the capacity (rows·kl lines of 32 values); the padding of each row
        // (columns k..lda) and the rows past m.
        unsafe {
            if lda > k {
                for i in 0..m {
                    std::ptr::write_bytes(base.add(i * lda + k), 0, lda - k);
                }
            }
            std::ptr::write_bytes(base.add(m * lda), 0, (rows - m) * lda);
            fill(Out(base), lda);
            // Every value written: the padding above, the rest by `fill` (the caller's word).
            data.set_len(rows * kl);
        }
        Self { data, m, k, kl }
    }

    /// (m, k).
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.m, self.k)
    }

    /// Rows 32·rb.. of the block `rb` (32 rows of `kl` lines).
    fn block(&self, rb: usize) -> &[u16] {
        as_u16(&self.data[rb * BLOCK * self.kl..(rb + 1) * BLOCK * self.kl])
    }
}

/// The `A` of a product: f32 activations (rounded to bf16 block by block inside the tasks)
/// or ones already in bf16.
#[derive(Clone, Copy)]
enum Act<'a> {
    F32(&'a [f32]),
    Bf16(&'a Bf16Rows),
}

/// One product of [`run`]: `c (m×n, row stride ldc) [+]= A · b`.
struct Target<'a> {
    b: &'a Panels,
    c: Out,
    ldc: usize,
    accumulate: bool,
}

/// Panel pairs per task when the rows alone do not give every thread work (a few rows: the
/// columns are split too).
const PAIRS_PER_TASK: usize = 8;

/// Bytes of `B` panels one task's sweep may cover so that they stay in the core's L2 cache
/// while the next row blocks pass them again: half of L2 (from sysconf; 1 MiB if unknown).
/// Wider weights are swept in column chunks of this size, each over every row block, so
/// that they are read from L3 once per chunk and not once per 32 rows (SmolLM2's gate and up
/// together are 3.5 MB: from 490 to 1,300+ GF/s on AMX).
fn panel_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        // SAFETY: sysconf takes an integer and returns one.
        let l2 = unsafe { libc::sysconf(libc::_SC_LEVEL2_CACHE_SIZE) };
        let l2 = if l2 > 0 { l2 as usize } else { 1 << 20 };
        (l2 / 2).clamp(128 << 10, 4 << 20)
    })
}

/// A product's tasks: `(row block, first pair, end pair)` over `pairs` panel pairs (32
/// columns each) of `pair_bytes` bytes of panels per pair position, in the order they are
/// handed out. Many rows and panels that fit [`panel_budget`]: one task per row block, over
/// every column. Many rows and wider panels: column chunks that fit, chunk after chunk, each
/// over every row block. Few rows: every row block split into [`PAIRS_PER_TASK`] pairs, so
/// that every thread has work.
fn plan(
    row_blocks: usize,
    pairs: usize,
    pair_bytes: usize,
    threads: usize,
) -> Vec<(usize, usize, usize)> {
    let chunk = if row_blocks < 2 * threads {
        PAIRS_PER_TASK
    } else {
        let per = (panel_budget() / pair_bytes.max(1)).max(1);
        // Chunks of one size: as many as the budget needs.
        pairs.div_ceil(pairs.div_ceil(per).max(1)).max(1)
    };
    let starts = (0..pairs).step_by(chunk);
    if chunk >= pairs || row_blocks < 2 * threads {
        (0..row_blocks)
            .flat_map(|rb| {
                starts
                    .clone()
                    .map(move |p0| (rb, p0, (p0 + chunk).min(pairs)))
            })
            .collect()
    } else {
        starts
            .flat_map(|p0| (0..row_blocks).map(move |rb| (rb, p0, (p0 + chunk).min(pairs))))
            .collect()
    }
}

thread_local! {
    /// The task's 32 rows of `A` in bf16: converted where they are multiplied, so they are
    /// read from memory once, never stored whole, and sit in L1 while every panel passes.
    static A_ROWS: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows `r0..r0 + 32` of `x` (m×k f32, row major) in bf16 into `buf` (32 rows of `kl` lines,
/// zeros past `k` and past `m`).
fn convert_block(x: &[f32], m: usize, k: usize, r0: usize, kl: usize, buf: &mut Vec<Line>) {
    buf.clear();
    buf.resize(BLOCK * kl, ZERO);
    let rows = as_u16_mut(buf);
    for r in 0..BLOCK.min(m - r0) {
        let src = &x[(r0 + r) * k..(r0 + r + 1) * k];
        convert(src, &mut rows[r * kl * 32..r * kl * 32 + k]);
    }
}

/// Panics unless `kernel` is a bf16 kernel this CPU runs (asking Linux for AMX's registers
/// the first time; cached) and `x` holds m×k values.
fn check(kernel: Kernel, x: Act, m: usize, k: usize) {
    assert!(kernel.is_bf16(), "bf16 product with the f32 kernel");
    if let Err(why) = kernel.available() {
        panic!("bf16 product with the {} kernel: {why}", kernel.name());
    }
    let (xm, xk) = match x {
        Act::F32(v) => {
            assert_eq!(
                v.len(),
                m * k,
                "bf16 product: {} values for {m}×{k}",
                v.len()
            );
            (m, k)
        }
        Act::Bf16(r) => r.dims(),
    };
    assert!(
        (xm, xk) == (m, k),
        "bf16 product: A is {xm}×{xk}, expected {m}×{k}"
    );
}

/// Row block `rb` of `x` in bf16 as the kernels read it (32 rows of `kl` lines): converted
/// into `buf`, or in place when `x` is already bf16.
fn a_block<'b>(
    x: Act<'b>,
    m: usize,
    k: usize,
    rb: usize,
    kl: usize,
    buf: &'b mut Vec<Line>,
) -> &'b [u16] {
    match x {
        Act::F32(v) => {
            convert_block(v, m, k, rb * BLOCK, kl, buf);
            as_u16(buf)
        }
        Act::Bf16(r) => r.block(rb),
    }
}

/// Every product of `targets`, each `c [+]= bf16(x) · b` with `x` (m×k; f32 row major is
/// rounded to bf16 as it is converted, 32 rows at a time inside each task). Tasks as
/// [`plan`] makes them; where all targets' panels fit the cache budget, one task per 32-row
/// block over every product and column (its rows converted once).
///
/// # Safety
/// Each target's `c` must be valid for writes (and, with `accumulate`, reads of initialised
/// values) of the m×n product at row stride `ldc ≥ n`, alias nothing else in use and no other
/// target's `c`.
unsafe fn run(kernel: Kernel, x: Act, m: usize, k: usize, targets: &[Target], parallel: bool) {
    check(kernel, x, m, k);
    let kl = k.div_ceil(32).max(1);
    for t in targets {
        assert_eq!(t.b.k, k, "bf16 product: A has k = {k}, B has k = {}", t.b.k);
        assert_eq!(kl * 16, t.b.kq, "bf16 product: A and B padded differently");
        assert!(t.ldc >= t.b.n);
        debug_assert!(t.b.n.div_ceil(2 * 16) * 2 <= t.b.np);
    }
    if m == 0 {
        return;
    }
    let row_blocks = m.div_ceil(BLOCK);
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let pairs = |t: &Target| t.b.n.div_ceil(2 * 16);
    let pair_bytes = |t: &Target| 2 * t.b.kq * 64;
    // (row block, target, first pair, end pair) per task; all targets' panels in one task per
    // row block where they fit the cache together (its rows converted once for all).
    let mut tasks: Vec<(usize, usize, usize, usize)> = Vec::new();
    let all: usize = targets.iter().map(|t| pairs(t) * pair_bytes(t)).sum();
    if row_blocks >= 2 * threads && all <= panel_budget() {
        tasks.extend((0..row_blocks).map(|rb| (rb, usize::MAX, 0, 0)));
    } else {
        for (ti, t) in targets.iter().enumerate() {
            let each = plan(row_blocks, pairs(t), pair_bytes(t), threads);
            tasks.extend(each.into_iter().map(|(rb, p0, p1)| (rb, ti, p0, p1)));
        }
    }
    let task = |&(rb, ti, p0, p1): &(usize, usize, usize, usize)| {
        A_ROWS.with(|buf| {
            let mut buf = buf.borrow_mut();
            let r0 = rb * BLOCK;
            let arows = a_block(x, m, k, rb, kl, &mut buf);
            let work: Vec<(&Target, usize, usize)> = if ti == usize::MAX {
                targets.iter().map(|t| (t, 0, pairs(t))).collect()
            } else {
                vec![(&targets[ti], p0, p1)]
            };
            for (t, p0, p1) in work {
                let (b, n, ldc, out, accumulate) = (t.b, t.b.n, t.ldc, t.c, t.accumulate);
                let blocks = (p0..p1).map(|p| (p, b.panel(2 * p), b.panel(2 * p + 1)));
                let mut store = |p: usize, block: &[f32; BLOCK * BLOCK]| {
                    let (rows, c0) = ((m - r0).min(BLOCK), 2 * 16 * p);
                    let cols = (n - c0).min(2 * 16);
                    for r in 0..rows {
                        let src = &block[r * BLOCK..r * BLOCK + cols];
                        // SAFETY: row r0 + r < m and columns c0..c0 + cols < n lie inside this
                        // target's `c` (the caller's contract); no other task writes them.
                        // Without `accumulate` they are only written (the memory may be
                        // uninitialised).
                        unsafe {
                            let dst = out.0.add((r0 + r) * ldc + c0);
                            if accumulate {
                                for (j, s) in src.iter().enumerate() {
                                    *dst.add(j) += s;
                                }
                            } else {
                                std::ptr::copy_nonoverlapping(src.as_ptr(), dst, cols);
                            }
                        }
                    }
                };
                let lda = kl * 32;
                // A whole block that is only written: the tiles store it in place.
                let full = m - r0 >= BLOCK && !accumulate;
                let direct = |p: usize| {
                    let c0 = 2 * 16 * p;
                    // SAFETY: rows r0..r0 + 32 < m, columns c0..c0 + 32 ≤ n of this target's
                    // `c` (the caller's contract), written by this task only.
                    (full && n - c0 >= 2 * 16).then(|| (unsafe { out.at((r0 * ldc) + c0) }, ldc))
                };
                match kernel {
                    // SAFETY: `direct` gives only whole 32×32 blocks inside `c` (above).
                    Kernel::AmxBf16 => unsafe {
                        amx::blocks_direct(arows, lda, b.kq, blocks, &mut store, direct)
                    },
                    Kernel::Avx512Bf16 => avx512::blocks(arows, lda, b.kq, blocks, &mut store),
                    _ => emulated::blocks(arows, lda, b.kq, blocks, &mut store),
                }
            }
        })
    };
    if tasks.len() == 1 || threads == 1 {
        tasks.iter().for_each(task);
    } else {
        tasks.par_iter().for_each(task);
    }
}

/// `c (m×n, row stride ldc) [+]= bf16(x) (m×k) · b (k×n)` with `kernel` (a bf16 kernel).
pub fn gemm(
    kernel: Kernel,
    x: &[f32],
    m: usize,
    b: &Panels,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    gemm_act(kernel, Act::F32(x), m, b, c, ldc, accumulate)
}

fn gemm_act(
    kernel: Kernel,
    x: Act,
    m: usize,
    b: &Panels,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m > 0 && b.n > 0 {
        assert!(
            ldc >= b.n && c.len() >= (m - 1) * ldc + b.n,
            "bf16 gemm: C too small"
        );
    }
    let t = Target {
        b,
        c: Out(c.as_mut_ptr()),
        ldc,
        accumulate,
    };
    // SAFETY: `c` holds the m×n product at row stride ldc (asserted), initialised, unaliased.
    unsafe { run(kernel, x, m, b.k, &[t], true) }
}

/// [`gemm`] for activations already in bf16: `c (m×n) [+]= x (m×k) · b`.
pub(crate) fn gemm_rows(
    kernel: Kernel,
    x: &Bf16Rows,
    b: &Panels,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    gemm_act(kernel, Act::Bf16(x), x.m, b, c, ldc, accumulate)
}

/// `x (m×k, already bf16) · b` into a new (m×n) buffer.
pub(crate) fn product_rows(kernel: Kernel, x: &Bf16Rows, b: &Panels) -> Vec<f32> {
    products_on(kernel, Act::Bf16(x), x.m, &[b], true)
        .pop()
        .expect("one product")
}

/// `bf16(x) (m×k) · b` for each `b` of `bs` (all k rows), each into a new (m×n) buffer that is
/// never zeroed first (the product writes every element); `x` converted once for all.
pub fn products(kernel: Kernel, x: &[f32], m: usize, bs: &[&Panels]) -> Vec<Vec<f32>> {
    products_on(kernel, Act::F32(x), m, bs, true)
}

/// [`products`] on the calling thread only: for the small products inside an op's own
/// parallel loop (attention's, per head).
pub fn products_serial(kernel: Kernel, x: &[f32], m: usize, bs: &[&Panels]) -> Vec<Vec<f32>> {
    products_on(kernel, Act::F32(x), m, bs, false)
}

fn products_on(kernel: Kernel, x: Act, m: usize, bs: &[&Panels], parallel: bool) -> Vec<Vec<f32>> {
    let k = bs.first().map_or(0, |b| b.k);
    let mut outs: Vec<Vec<f32>> = bs.iter().map(|b| Vec::with_capacity(m * b.n)).collect();
    let targets: Vec<Target> = bs
        .iter()
        .zip(outs.iter_mut())
        .map(|(b, c)| Target {
            b,
            c: Out(c.as_mut_ptr()),
            ldc: b.n,
            accumulate: false,
        })
        .collect();
    // SAFETY: each buffer has room for its m×n product at row stride n and is its own
    // allocation; without `accumulate` every element is written and none read, so all are
    // initialised when the lengths are set.
    unsafe {
        run(kernel, x, m, k, &targets, parallel);
        for (c, b) in outs.iter_mut().zip(bs) {
            c.set_len(m * b.n);
        }
    }
    outs
}

/// What an epilogue gets: `(r0, c0, rows, cols, blocks)`, the 32×32 blocks of its products at
/// rows `r0..` and columns `c0..` (the first `rows` × `cols` valid).
pub(crate) type Epilogue<'e, const N: usize> =
    dyn Fn(usize, usize, usize, usize, [&[f32; BLOCK * BLOCK]; N]) + Sync + 'e;

/// `N` products over the same columns, `bf16(x)·b` for each `b` of `bs` (all k×n), block by
/// block: `each` gets the blocks of one position of all of them, in the task that made them,
/// while they are in cache; no product is written anywhere else. Tasks as [`plan`] makes
/// them; each block position is handed out once. (The MLP's gate and up, combined by SwiGLU
/// into its activation.)
pub(crate) fn blocks_each<const N: usize>(
    kernel: Kernel,
    x: &[f32],
    m: usize,
    bs: [&Panels; N],
    each: &Epilogue<N>,
) {
    let (k, n) = (bs[0].k, bs[0].n);
    check(kernel, Act::F32(x), m, k);
    assert!(
        bs.iter().all(|b| b.k == k && b.n == n),
        "products over the same columns of different shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    let kl = k.div_ceil(32).max(1);
    let kq = bs[0].kq;
    assert_eq!(kl * 16, kq, "bf16 product: A and B padded differently");
    let row_blocks = m.div_ceil(BLOCK);
    let threads = rayon::current_num_threads();
    let pairs = n.div_ceil(2 * 16);
    // All products' panels for each pair position.
    let tasks = plan(row_blocks, pairs, N * 2 * kq * 64, threads);
    let task = |&(rb, p0, p1): &(usize, usize, usize)| {
        A_ROWS.with(|buf| {
            let mut buf = buf.borrow_mut();
            let r0 = rb * BLOCK;
            let arows = a_block(Act::F32(x), m, k, rb, kl, &mut buf);
            // Panel pair p of product i as block N·p + i: one kernel call (one tile
            // configuration) for the task, the blocks of a position back to back.
            let blocks = (p0..p1).flat_map(|p| {
                bs.iter()
                    .enumerate()
                    .map(move |(i, b)| (N * p + i, b.panel(2 * p), b.panel(2 * p + 1)))
            });
            let mut saved = [[0f32; BLOCK * BLOCK]; N];
            let rows = (m - r0).min(BLOCK);
            let mut store = |q: usize, block: &[f32; BLOCK * BLOCK]| {
                let (p, i) = (q / N, q % N);
                if i + 1 < N {
                    saved[i].copy_from_slice(block);
                } else {
                    let c0 = 2 * 16 * p;
                    let blocks = std::array::from_fn(|j| if j == i { block } else { &saved[j] });
                    each(r0, c0, rows, (n - c0).min(2 * 16), blocks);
                }
            };
            let lda = kl * 32;
            match kernel {
                Kernel::AmxBf16 => amx::blocks(arows, lda, kq, blocks, &mut store),
                Kernel::Avx512Bf16 => avx512::blocks(arows, lda, kq, blocks, &mut store),
                _ => emulated::blocks(arows, lda, kq, blocks, &mut store),
            }
        })
    };
    if tasks.len() == 1 || threads == 1 {
        tasks.iter().for_each(task);
    } else {
        tasks.par_iter().for_each(task);
    }
}

/// `x (m×k) · Wᵀ` for a packed weight: the forward product of a projection (m×out).
pub fn forward(kernel: Kernel, x: &[f32], m: usize, w: &Bf16Weight) -> Vec<f32> {
    products(kernel, x, m, &[w.fwd()])
        .pop()
        .expect("one product")
}

/// `g (m×out) · W`: the backward product of a projection (m×in), in a new buffer.
pub fn backward(kernel: Kernel, g: &[f32], m: usize, w: &Bf16Weight) -> Vec<f32> {
    products(kernel, g, m, &[w.bwd()])
        .pop()
        .expect("one product")
}

/// `dst (m×in) [+]= g (m×out) · W`: the backward product of a projection into `dst`.
pub fn backward_into(
    kernel: Kernel,
    g: &[f32],
    m: usize,
    w: &Bf16Weight,
    dst: &mut [f32],
    accumulate: bool,
) {
    let inp = w.dims().1;
    gemm(kernel, g, m, w.bwd(), dst, inp, accumulate);
}

/// This machine's rate with `kernel` in GFLOP/s on a projection's shapes, as
/// [`super::gemm_gflops`] measures the f32 one: `x (m×k) · Wᵀ` with `W` (n, k) and `g (m×n) · W`,
/// the activations packed inside the timing (as every call does); the mean of both, best of
/// `reps` runs each.
pub fn gflops(kernel: Kernel, m: usize, n: usize, k: usize, reps: usize) -> f64 {
    let x: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i % 5) as f32 - 2.0) * 0.01).collect();
    let g: Vec<f32> = (0..m * n).map(|i| ((i % 3) as f32 - 1.0) * 0.01).collect();
    let bw = Bf16Weight::new(&w, n, k);
    bw.bwd();
    let mut dx = vec![0f32; m * k];
    let flop = 2.0 * (m * n * k) as f64;
    let mut best = [f64::INFINITY; 2];
    for _ in 0..reps.max(1) + 1 {
        let t = std::time::Instant::now();
        let y = forward(kernel, &x, m, &bw);
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        std::hint::black_box(&y);
        let t = std::time::Instant::now();
        backward_into(kernel, &g, m, &bw, &mut dx, false);
        best[1] = best[1].min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dx);
    (flop / best[0] + flop / best[1]) / 2.0 / 1e9
}

#[cfg(test)]
mod tests;
