//! The frozen projections in bf16 where the CPU multiplies bf16 natively: AMX on Intel Xeon
//! (Sapphire Rapids and later), AVX512-BF16 (Zen 4, Cooper Lake and later), f32 everywhere
//! else. Written by hand: no crate fits (the `gemm` crate has no bf16 kernel and converts f16 to
//! f32 while packing; candle's CPU matmul rejects bf16; `gemmkit` 0.1.2 multiplies bf16 into a
//! bf16 output, and has no AMX).
//!
//! One product, `C (m×n, f32) [+]= A (m×k) · B (k×n)`, with
//! - `A` the activations ([`Rows`]): rounded to bf16 (round to nearest even) while packed, row
//!   major, rows padded to 32 and `k` to 32 with zeros;
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

    /// The fastest kernel this CPU runs natively: AMX, else AVX512-BF16, else f32.
    pub fn best() -> Kernel {
        [Kernel::AmxBf16, Kernel::Avx512Bf16]
            .into_iter()
            .find(|k| k.available().is_ok())
            .unwrap_or(Kernel::F32)
    }
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
const BLOCK: usize = 32;

/// The `A` operand: `m` rows of `k` values in bf16, row major, `m` padded to 32 rows and `k` to
/// 32 values with zeros.
pub struct Rows {
    data: Vec<Line>,
    m: usize,
    k: usize,
    /// Lines per row (`k` padded to 32, over 32).
    kl: usize,
}

impl Rows {
    /// `x` (m×k, row major) rounded to bf16.
    pub fn pack(x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(x.len(), m * k, "bf16 rows: {} values for {m}×{k}", x.len());
        let kl = k.div_ceil(32).max(1);
        let mp = m.div_ceil(BLOCK).max(1) * BLOCK;
        let mut data: Vec<Line> = Vec::with_capacity(mp * kl);
        // Every line is written below (the values, then zeros past k and past m), so the
        // buffer is never zeroed first.
        let rows = data.spare_capacity_mut();
        const ROWS: usize = 8; // per parallel task
        rows.par_chunks_mut(kl * ROWS)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (i, row) in chunk.chunks_mut(kl).enumerate() {
                    let r = c * ROWS + i;
                    // SAFETY: a `Line` is plain data; every element of `row` is written here.
                    let row: &mut [Line] = unsafe { &mut *(row as *mut [_] as *mut [Line]) };
                    if r < m {
                        let v = as_u16_mut(row);
                        convert(&x[r * k..(r + 1) * k], &mut v[..k]);
                        v[k..].fill(0);
                    } else {
                        row.fill(ZERO);
                    }
                }
            });
        // SAFETY: all mp·kl lines were written above.
        unsafe { data.set_len(mp * kl) };
        Self { data, m, k, kl }
    }

    /// Value (r, c), for tests.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        from_bf16(as_u16(&self.data)[r * self.kl * 32 + c])
    }
}

/// f32 → bf16 element-wise (the CPU's own conversion where it has one).
fn convert(src: &[f32], dst: &mut [u16]) {
    if avx512::available().is_ok() {
        // SAFETY: AVX512-BF16 is present (checked).
        unsafe { avx512::convert(src, dst) }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = to_bf16(s);
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
        let kq = k.div_ceil(32).max(1) * 16;
        let np = n.div_ceil(2 * 16).max(1) * 2;
        let mut data = vec![ZERO; np * kq];
        data.par_chunks_mut(kq).enumerate().for_each(|(p, panel)| {
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
        });
        Self { data, k, n, kq, np }
    }

    /// `Wᵀ` for a weight `w` (out × in, row major): the forward product `x Wᵀ` (k = in).
    pub fn transposed(w: &[f32], out: usize, inp: usize) -> Self {
        Self::pack(inp, out, |i, j| w[j * inp + i])
    }

    /// `W` itself for a weight `w` (out × in): the backward product `dy W` (k = out).
    pub fn plain(w: &[f32], out: usize, inp: usize) -> Self {
        Self::pack(out, inp, |i, j| w[i * inp + j])
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

/// A raw pointer into `C` that the tasks of one product share: each writes its own block.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the tasks write disjoint blocks of `C` (see `gemm`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Panel pairs per task: a task is one 32-row block of `C` over this many 32-column blocks (its
/// slice of `B` stays in L2 while the rows' `A` sits in L1).
const PAIRS_PER_TASK: usize = 8;

/// `c (m×n, row stride ldc) [+]= a (m×k) · b (k×n)` with `kernel` (a bf16 kernel).
pub fn gemm(kernel: Kernel, a: &Rows, b: &Panels, c: &mut [f32], ldc: usize, accumulate: bool) {
    if a.m > 0 && b.n > 0 {
        assert!(
            ldc >= b.n && c.len() >= (a.m - 1) * ldc + b.n,
            "bf16 gemm: C too small"
        );
    }
    // SAFETY: `c` holds the m×n product at row stride ldc (asserted), initialised, unaliased.
    unsafe { gemm_raw(kernel, a, b, c.as_mut_ptr(), ldc, accumulate) }
}

/// [`gemm`] into raw memory.
///
/// # Safety
/// `c` must be valid for writes (and, with `accumulate`, reads of initialised values) of the
/// m×n product at row stride `ldc ≥ n`, and alias nothing else in use.
unsafe fn gemm_raw(
    kernel: Kernel,
    a: &Rows,
    b: &Panels,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let (m, n, k) = (a.m, b.n, a.k);
    assert_eq!(k, b.k, "bf16 gemm: A has k = {k}, B has k = {}", b.k);
    assert!(kernel.is_bf16(), "bf16 gemm with the f32 kernel");
    // Also asks Linux for AMX's registers the first time (once per process; cached).
    if let Err(why) = kernel.available() {
        panic!("bf16 gemm with the {} kernel: {why}", kernel.name());
    }
    if m == 0 || n == 0 {
        return;
    }
    assert_eq!(a.kl * 16, b.kq, "bf16 gemm: A and B padded differently");
    let row_blocks = m.div_ceil(BLOCK);
    let pairs = n.div_ceil(2 * 16);
    debug_assert!(2 * pairs <= b.np);
    let chunks = pairs.div_ceil(PAIRS_PER_TASK);
    let out = Out(c);
    let task = move |t: usize| {
        let out = out;
        let (rb, ch) = (t / chunks, t % chunks);
        let r0 = rb * BLOCK;
        let lda = a.kl * 32;
        let arows = &as_u16(&a.data)[r0 * lda..(r0 + BLOCK) * lda];
        let pp = ch * PAIRS_PER_TASK..((ch + 1) * PAIRS_PER_TASK).min(pairs);
        let blocks = pp.map(|p| (p, b.panel(2 * p), b.panel(2 * p + 1)));
        let mut store = |p: usize, block: &[f32; BLOCK * BLOCK]| {
            let (rows, c0) = ((m - r0).min(BLOCK), 2 * 16 * p);
            let cols = (n - c0).min(2 * 16);
            for r in 0..rows {
                // SAFETY: row r0 + r < m and columns c0..c0 + cols < n lie inside `c` (checked
                // above); no other task writes this block.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.0.add((r0 + r) * ldc + c0), cols) };
                let src = &block[r * BLOCK..r * BLOCK + cols];
                if accumulate {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                } else {
                    dst.copy_from_slice(src);
                }
            }
        };
        match kernel {
            Kernel::AmxBf16 => amx::blocks(arows, lda, b.kq, blocks, &mut store),
            Kernel::Avx512Bf16 => avx512::blocks(arows, lda, b.kq, blocks, &mut store),
            _ => emulated::blocks(arows, lda, b.kq, blocks, &mut store),
        }
    };
    let tasks = row_blocks * chunks;
    if tasks == 1 || rayon::current_num_threads() == 1 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// `a · b` into a new (m×n) buffer that is never zeroed first: the product writes every
/// element.
pub fn product(kernel: Kernel, a: &Rows, b: &Panels) -> Vec<f32> {
    let (m, n) = (a.m, b.n);
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: room for m×n at row stride n; without `accumulate` every element is written
    // (each block's valid rows and columns) and none read, so all are initialised after.
    unsafe {
        gemm_raw(kernel, a, b, c.as_mut_ptr(), n, false);
        c.set_len(m * n);
    }
    c
}

/// `x (m×k) · Wᵀ` for a packed weight: the forward product of a projection (m×out).
pub fn forward(kernel: Kernel, x: &[f32], m: usize, w: &Bf16Weight) -> Vec<f32> {
    let (_, inp) = w.dims();
    product(kernel, &Rows::pack(x, m, inp), w.fwd())
}

/// `g (m×out) · W`: the backward product of a projection (m×in), in a new buffer.
pub fn backward(kernel: Kernel, g: &[f32], m: usize, w: &Bf16Weight) -> Vec<f32> {
    let (out, _) = w.dims();
    product(kernel, &Rows::pack(g, m, out), w.bwd())
}

/// `g (m×out) · W` [+ into `dst`]: the backward product of a projection (m×in).
pub fn backward_into(
    kernel: Kernel,
    g: &[f32],
    m: usize,
    w: &Bf16Weight,
    dst: &mut [f32],
    accumulate: bool,
) {
    let (out, inp) = w.dims();
    let a = Rows::pack(g, m, out);
    gemm(kernel, &a, w.bwd(), dst, inp, accumulate);
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
