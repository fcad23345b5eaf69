//! Fused decoder operations for the CPU, each a candle custom op with its own backward pass.
//!
//! candle's fused `rms_norm`, `rope` and `softmax_last_dim` record no backward pass, and their
//! composed replacements (the reference versions in [`composed`]) allocate and keep one tensor
//! per elementary op. Each op here reads its inputs once, writes one output, keeps only its
//! inputs for the backward pass (which recomputes everything else), and runs on rayon's pool:
//!
//! - [`rms_norm`]: RMSNorm, normalised in f32 and scaled in the compute dtype (as transformers);
//! - [`rope`]: rotary embeddings from per-row position tables (left or right padding);
//! - [`swiglu`]: `silu(gate) * up`;
//! - [`attention`]: causal attention with a per-row key mask (no T×T mask tensor), RoPE applied
//!   to q and k inside (the rotated copies are never stored), grouped-query heads read in place
//!   (no K/V copies), output already in `(B, T, heads·hd)` order; the backward recomputes the
//!   probabilities flash-style, so memory grows with T, not T²;
//! - [`dropout`]: inverted dropout drawing the same ChaCha stream as the composed
//!   `collm_nn::layers::dropout`, but in parallel (ChaCha is counter-based: each chunk seeks to
//!   its position); the mask is kept as bits, not as a tensor;
//! - [`linear`]: a frozen projection `x Wᵀ (+ b)` with its whole LoRA path inside
//!   (`+ scaling · dropout(x) Aᵀ Bᵀ`, the mask drawn by [`dropout_mask`] and kept as bits), whose
//!   backward gives `x`, `A` and `B` gradients and the frozen weight none; on `(…, in)` as it
//!   comes, so no reshape nodes enter the graph;
//! - [`mlp`]: gate, up, SwiGLU and down in one op (where the MLP has no LoRA), keeping only gate
//!   and up for its backward;
//! - [`attention_flat`]: [`attention`] on heads side by side, `(B, T, heads·hd)`;
//! - [`prefix_attention`]: suffix rows over cached prompt prefixes (shared-prefix scoring, and
//!   step 2's training passes over a frozen prefix), with a backward into the suffixes only.
//!
//! Fewer, larger ops matter beyond their own loops: every tensor between two ops costs a
//! full-size zeros-and-add in candle's backward pass (`GradStore::or_insert`), on one thread.
//!
//! Every op is checked against [`composed`] (forward and gradients) and by finite differences in
//! `tests/fused_ops.rs`. Only the CPU has these kernels; on other devices the decoder takes the
//! composed path (`Decoder::set_fused`). Tensors are f32 or bf16; bf16 is computed in f32.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor,
};
use half::bf16;
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Storage helpers
// ---------------------------------------------------------------------------------------------

/// The contiguous elements of a CPU storage as f32 (borrowed when already f32).
fn as_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [f32]>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("fused op: input must be contiguous");
    };
    match s {
        CpuStorage::F32(v) => Ok(Cow::Borrowed(&v[a..b])),
        CpuStorage::BF16(v) => Ok(Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect())),
        _ => bail!("fused op: f32 or bf16 expected, got {:?}", s.dtype()),
    }
}

/// A storage of `dtype` from f32 values.
fn from_f32(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    match dtype {
        DType::F32 => Ok(CpuStorage::F32(v)),
        DType::BF16 => Ok(CpuStorage::BF16(
            v.into_par_iter().map(bf16::from_f32).collect(),
        )),
        d => bail!("fused op: f32 or bf16 expected, got {d:?}"),
    }
}

/// Rounds through `dtype` (identity for f32), as a composed op in that dtype would.
#[inline]
fn round(x: f32, dtype: DType) -> f32 {
    if dtype == DType::BF16 {
        bf16::from_f32(x).to_f32()
    } else {
        x
    }
}

/// Binds `$v` to the elements of the CPU tensor `$t` as f32 for the rest of the block:
/// borrowed from its storage when it is a contiguous f32 tensor (no copy), converted otherwise.
macro_rules! cpu_f32 {
    ($t:expr => $v:ident) => {
        let contiguous = $t.contiguous()?;
        let guard = contiguous.storage_and_layout();
        let $v: Cow<[f32]> = match &*guard.0 {
            Storage::Cpu(c) => as_f32(c, guard.1)?,
            _ => bail!("fused op: CPU tensor expected"),
        };
    };
}

/// `eˣ` in f32 without branches or library calls, so that loops over it vectorize: Cephes'
/// `expf` (reduction by ln 2 in two parts, degree-5 polynomial, relative error ~1e-7). Inputs
/// are clamped to [−87, 88] (results from 1.6e-38 to 1.7e38).
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest with the 1.5·2²³ trick (no `round` call).
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// A tensor shaped and typed like `like` from f32 values (converted in parallel for bf16).
fn tensor_from(v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    match like.dtype() {
        DType::BF16 => {
            let h: Vec<bf16> = v.into_par_iter().map(bf16::from_f32).collect();
            Tensor::from_vec(h, like.shape(), like.device())
        }
        _ => Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(like.dtype()),
    }
}

fn pool_parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)`, all f32, with explicit (row, column) strides.
#[allow(clippy::too_many_arguments)]
fn matmul(
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
    par: gemm::Parallelism,
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
fn matmul_new(
    (m, n, k): (usize, usize, usize),
    lhs: (&[f32], (usize, usize)),
    rhs: (&[f32], (usize, usize)),
    par: gemm::Parallelism,
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
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // The last element each operand touches must be inside its slice.
    if k > 0 {
        assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
        assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    }
    gemm::gemm(
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

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dtype = xs.dtype();
        let x = as_f32(xs, xl)?;
        let w = as_f32(ws, wl)?;
        let h = w.len();
        if h == 0 || xl.shape().dims().last() != Some(&h) {
            bail!("rms-norm: weight of {h} for input {:?}", xl.shape());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            for ((y, x), w) in y.iter_mut().zip(x).zip(w.iter()) {
                *y = round(round(x * r, dtype) * w, dtype);
            }
        });
        Ok((from_f32(y, dtype)?, xl.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        cpu_f32!(x => xv);
        cpu_f32!(w => wv);
        cpu_f32!(grad => g);
        let h = wv.len();
        let mut dx = vec![0f32; xv.len()];
        dx.par_chunks_mut(h)
            .zip(xv.par_chunks(h).zip(g.par_chunks(h)))
            .for_each(|(dx, (x, g))| {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                // d/dx of x·r: r·(gw − x̂·mean(gw·x̂)), with gw = g·w and x̂ = x·r.
                let c = x
                    .iter()
                    .zip(g)
                    .zip(wv.iter())
                    .map(|((x, g), w)| g * w * x * r)
                    .sum::<f32>()
                    / h as f32;
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(wv.iter()) {
                    *dx = r * (g * w - x * r * c);
                }
            });
        let dw = if w.track_op() {
            let rows = xv.len() / h;
            let mut dw = vec![0f32; h];
            for k in 0..rows {
                let x = &xv[k * h..(k + 1) * h];
                let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                for ((d, x), g) in dw.iter_mut().zip(x).zip(&g[k * h..(k + 1) * h]) {
                    *d += g * x * r;
                }
            }
            Some(tensor_from(dw, w)?)
        } else {
            None
        };
        Ok((Some(tensor_from(dx, x)?), dw))
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------------

/// cos/sin tables for a batch: (B·T, hd/2) each, from per-position ids.
#[derive(Clone)]
pub struct RopeTables {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    half: usize,
    rows: usize,
}

impl RopeTables {
    /// `positions` is (B·T) position ids; `inv_freq` has hd/2 entries.
    pub fn new(positions: &[f32], inv_freq: &[f32]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            half,
            rows: positions.len(),
        }
    }
}

impl RopeTables {
    /// The tables of some rows: row `k` of the result is row `rows[k]` of these.
    pub fn rows(&self, rows: &[usize]) -> Self {
        let pick = |t: &[f32]| -> Vec<f32> {
            rows.iter()
                .flat_map(|&r| t[r * self.half..(r + 1) * self.half].iter().copied())
                .collect()
        };
        Self {
            cos: Arc::new(pick(&self.cos)),
            sin: Arc::new(pick(&self.sin)),
            half: self.half,
            rows: rows.len(),
        }
    }
}

struct Rope {
    t: RopeTables,
    /// Rotate backwards (the backward pass of a forward rotation).
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dtype = s.dtype();
        let x = as_f32(s, l)?;
        let (half, rows) = (self.t.half, self.t.rows);
        let dims = l.shape().dims();
        // (B, T, heads, hd)
        if dims.len() != 4 || dims[0] * dims[1] != rows || dims[3] != 2 * half {
            bail!(
                "rope: input {dims:?} for tables of {rows} rows, hd {}",
                2 * half
            );
        }
        let per_row = dims[2] * dims[3];
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(per_row)
            .zip(x.par_chunks(per_row))
            .enumerate()
            .for_each(|(r, (y, x))| {
                let cos = &self.t.cos[r * half..(r + 1) * half];
                let sin = &self.t.sin[r * half..(r + 1) * half];
                for (y, x) in y.chunks_mut(2 * half).zip(x.chunks(2 * half)) {
                    let (x1, x2) = x.split_at(half);
                    let (y1, y2) = y.split_at_mut(half);
                    for i in 0..half {
                        let (c, s) = (round(cos[i], dtype), sign * round(sin[i], dtype));
                        y1[i] = x1[i] * c - x2[i] * s;
                        y2[i] = x2[i] * c + x1[i] * s;
                    }
                }
            });
        Ok((from_f32(y, dtype)?, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The rotation is orthogonal: its transpose is the rotation by −θ.
        let op = Rope {
            t: self.t.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1(op)?))
    }
}

/// Rotary embeddings (transformers' `rotate_half` convention) of `x`, (B, T, heads, hd).
pub fn rope(x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        t: tables.clone(),
        inverse: false,
    })
}

// ---------------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------------

struct SwiGlu;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `silu(g) · u` element-wise, rounded to `dtype` as the separate ops store it (silu, then
/// the product). The dtype test sits outside the loops, so that they vectorize.
fn swiglu_values(g: &[f32], u: &[f32], dtype: DType) -> Vec<f32> {
    let mut y = vec![0f32; g.len()];
    const CHUNK: usize = 4096;
    y.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(y, (g, u))| {
            if dtype == DType::BF16 {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = round(round(g * sigmoid(*g), dtype) * u, dtype);
                }
            } else {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(*g) * u;
                }
            }
        });
    y
}

/// The gradients of `silu(g) · u` for the output gradient `d`: (for g, for u), rounded to
/// `dtype`.
fn swiglu_grads(d: &[f32], g: &[f32], u: &[f32], dtype: DType) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    const CHUNK: usize = 4096;
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            d.par_chunks(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(u.par_chunks(CHUNK)),
        )
        .for_each(|((dg, du), ((d, g), u))| {
            for i in 0..d.len() {
                let s = sigmoid(g[i]);
                dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                du[i] = d[i] * g[i] * s;
            }
            if dtype == DType::BF16 {
                dg.iter_mut()
                    .chain(du.iter_mut())
                    .for_each(|v| *v = round(*v, dtype));
            }
        });
    (dg, du)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }
    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.shape() != ul.shape() {
            bail!("swiglu: gate {:?} vs up {:?}", gl.shape(), ul.shape());
        }
        let dtype = gs.dtype();
        let g = as_f32(gs, gl)?;
        let u = as_f32(us, ul)?;
        let y = swiglu_values(&g, &u, dtype);
        Ok((from_f32(y, dtype)?, gl.shape().clone()))
    }
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        cpu_f32!(gate => g);
        cpu_f32!(up => u);
        cpu_f32!(grad => d);
        let (dg, du) = swiglu_grads(&d, &g, &u, DType::F32);
        Ok((Some(tensor_from(dg, gate)?), Some(tensor_from(du, up)?)))
    }
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

// ---------------------------------------------------------------------------------------------
// MLP
// ---------------------------------------------------------------------------------------------

/// An MLP's gate and up projections from its forward pass, kept for the backward pass.
type GateUp = Arc<(Vec<f32>, Vec<f32>)>;

struct Mlp {
    /// (inter, hidden), (inter, hidden) and (hidden, inter), in the compute dtype; frozen.
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    /// Keep gate and up for the backward pass (a graph is being built).
    keep: bool,
    saved: std::sync::Mutex<Option<GateUp>>,
}

impl Mlp {
    /// `x Wgᵀ` and `x Wuᵀ` for `x` (n×hidden), rounded to `dtype` as separate projections
    /// would store them.
    fn gate_up(&self, x: &[f32], n: usize, dtype: DType) -> Result<(Vec<f32>, Vec<f32>)> {
        let (inter, h) = self.gate.dims2()?;
        cpu_f32!(self.gate => wg);
        cpu_f32!(self.up => wu);
        let proj = |w: &[f32]| {
            let mut y = matmul_new((n, inter, h), (x, (h, 1)), (w, (1, h)), pool_parallelism());
            if dtype == DType::BF16 {
                y.par_iter_mut().for_each(|v| *v = round(*v, dtype));
            }
            y
        };
        Ok((proj(&wg), proj(&wu)))
    }
}

impl CustomOp1 for Mlp {
    fn name(&self) -> &'static str {
        "fused-mlp"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dtype = s.dtype();
        let x = as_f32(s, l)?;
        let (inter, h) = self.gate.dims2()?;
        if l.shape().dims().last() != Some(&h)
            || self.up.dims() != [inter, h]
            || self.down.dims() != [h, inter]
        {
            bail!(
                "mlp: input {:?} for gate {:?}, up {:?}, down {:?}",
                l.shape(),
                self.gate.shape(),
                self.up.shape(),
                self.down.shape()
            );
        }
        let n = x.len() / h;
        let (g, u) = self.gate_up(&x, n, dtype)?;
        let act = swiglu_values(&g, &u, dtype);
        cpu_f32!(self.down => wd);
        let y = matmul_new(
            (n, h, inter),
            (&act, (inter, 1)),
            (&wd, (1, inter)),
            pool_parallelism(),
        );
        if self.keep {
            *self.saved.lock().expect("mlp state") = Some(Arc::new((g, u)));
        }
        Ok((from_f32(y, dtype)?, l.shape().clone()))
    }

    /// `da = g Wd`, through SwiGLU to `dgate` and `dup`, then `dx = dgate Wg + dup Wu`; each
    /// intermediate rounded to the compute dtype as the separate ops' outputs would be.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dtype = x.dtype();
        let saved = self.saved.lock().expect("mlp state").clone();
        let Some(saved) = saved else {
            bail!("mlp: the forward pass kept nothing for a backward pass");
        };
        let (g, u) = (&saved.0, &saved.1);
        let (inter, h) = self.gate.dims2()?;
        cpu_f32!(grad => d);
        let n = d.len() / h;
        cpu_f32!(self.down => wd);
        // da (n×inter) = d (n×hidden) · Wd (hidden×inter)
        let da = matmul_new(
            (n, inter, h),
            (&d, (h, 1)),
            (&wd, (inter, 1)),
            pool_parallelism(),
        );
        let mut da = da;
        if dtype == DType::BF16 {
            // As the separate down projection would hand it on: in bf16.
            da.par_iter_mut().for_each(|v| *v = round(*v, dtype));
        }
        let (dg, du) = swiglu_grads(&da, g, u, dtype);
        cpu_f32!(self.gate => wg);
        cpu_f32!(self.up => wu);
        // dx (n×hidden) = dgate · Wg + dup · Wu, W (inter×hidden)
        let mut dx = matmul_new(
            (n, h, inter),
            (&dg, (inter, 1)),
            (&wg, (h, 1)),
            pool_parallelism(),
        );
        matmul(
            n,
            h,
            inter,
            &mut dx,
            h,
            true,
            &du,
            (inter, 1),
            &wu,
            (h, 1),
            pool_parallelism(),
        );
        Ok(Some(tensor_from(dx, x)?))
    }
}

/// A whole LLaMA MLP, `silu(x Wgᵀ) ⊙ (x Wuᵀ)` then `· Wdᵀ`, for frozen weights `gate`, `up`
/// (inter, hidden) and `down` (hidden, inter), as one op: `x` (…, hidden) → (…, hidden). Its
/// backward gives `x` its gradient and keeps only the gate and up activations (no separate
/// SwiGLU output, and none of the intermediate gradients that separate ops would pass
/// through candle's backward, each a full-size zeros-and-add there).
pub fn mlp(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = Mlp {
        gate: gate.contiguous()?,
        up: up.contiguous()?,
        down: down.contiguous()?,
        keep: x.track_op(),
        saved: std::sync::Mutex::new(None),
    };
    x.apply_op1(op)
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// Which keys each row may attend to: key `j` of row `b` is real when `mask[b·T + j] == 1`;
/// attention is causal on top of that.
#[derive(Clone)]
pub struct KeyMask {
    pub data: Arc<Vec<u8>>,
    pub batch: usize,
    pub seq: usize,
}

struct Attention {
    mask: KeyMask,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    /// RoPE applied to q and k inside the kernel (so the rotated copies are never stored).
    rope: Option<RopeTables>,
}

impl Attention {
    /// Inputs are (B, T, heads, hd) or, heads side by side, (B, T, heads·hd).
    fn dims(&self, l: &Layout, heads: usize) -> Result<()> {
        let want = [self.mask.batch, self.mask.seq, heads, self.head_dim];
        let flat = [self.mask.batch, self.mask.seq, heads * self.head_dim];
        let dims = l.shape().dims();
        if dims != want && dims != flat {
            bail!(
                "attention: input {:?}, expected {want:?} or {flat:?}",
                l.shape()
            );
        }
        Ok(())
    }

    /// Head `h` of batch row `b` of `x` (B, T, n, hd) as a contiguous (T×hd) block, rotated
    /// by RoPE when `rotate` and the op has tables.
    fn gather(&self, x: &[f32], n: usize, b: usize, h: usize, rotate: bool) -> Vec<f32> {
        let (t, hd) = (self.mask.seq, self.head_dim);
        let mut out = Vec::with_capacity(t * hd);
        for i in 0..t {
            let r = (b * t + i) * n * hd + h * hd;
            out.extend_from_slice(&x[r..r + hd]);
        }
        if rotate {
            self.rotate(&mut out, b, false);
        }
        out
    }

    /// Applies RoPE (or its inverse) in place to a (T×hd) block of batch row `b`.
    fn rotate(&self, blk: &mut [f32], b: usize, inverse: bool) {
        let Some(rope) = &self.rope else {
            return;
        };
        let (t, hd) = (self.mask.seq, self.head_dim);
        let half = hd / 2;
        let sign = if inverse { -1.0 } else { 1.0 };
        for i in 0..t {
            let r = b * t + i;
            let cos = &rope.cos[r * half..(r + 1) * half];
            let sin = &rope.sin[r * half..(r + 1) * half];
            let (x1, x2) = blk[i * hd..(i + 1) * hd].split_at_mut(half);
            for d in 0..half {
                let (c, s) = (cos[d], sign * sin[d]);
                let (a, bb) = (x1[d], x2[d]);
                x1[d] = a * c - bb * s;
                x2[d] = bb * c + a * s;
            }
        }
    }

    /// Probabilities of query rows of one (batch row, head): `p` is T×T, row `i` over keys
    /// `0..=i` that are real; rows without a real key are all zero. `p` holds the scaled
    /// scores on entry.
    fn softmax_rows(&self, b: usize, p: &mut [f32]) {
        let t = self.mask.seq;
        let m = &self.mask.data[b * t..(b + 1) * t];
        // Left or right padding: the real keys are one run [start, end), and query i reads
        // keys [start, min(i + 1, end)) with no test per key (so the exp loop vectorizes).
        // The same values, summed in the same order, as the general loop below.
        let start = m.iter().position(|&x| x == 1).unwrap_or(t);
        let end = m.iter().rposition(|&x| x == 1).map_or(start, |e| e + 1);
        if m[start..end].iter().all(|&x| x == 1) {
            for i in 0..t {
                let row = &mut p[i * t..(i + 1) * t];
                let hi = (i + 1).min(end);
                if hi <= start {
                    row.fill(0.0);
                    continue;
                }
                let keys = &mut row[start..hi];
                let max = keys.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                for v in keys.iter_mut() {
                    *v = exp(*v - max);
                }
                let inv = 1.0 / keys.iter().sum::<f32>();
                for v in keys.iter_mut() {
                    *v *= inv;
                }
                row[..start].fill(0.0);
                row[hi..].fill(0.0);
            }
            return;
        }
        for i in 0..t {
            let row = &mut p[i * t..(i + 1) * t];
            let mut max = f32::NEG_INFINITY;
            for j in 0..=i {
                if m[j] == 1 {
                    max = max.max(row[j]);
                }
            }
            if max == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let mut sum = 0f32;
            for j in 0..=i {
                if m[j] == 1 {
                    let e = exp(row[j] - max);
                    row[j] = e;
                    sum += e;
                } else {
                    row[j] = 0.0;
                }
            }
            let inv = 1.0 / sum;
            for v in &mut row[..=i] {
                *v *= inv;
            }
            row[i + 1..].fill(0.0);
        }
    }

    /// The first real key of batch row `b` (keys and queries before it are padding) and the
    /// causal row blocks from there: block [r0, r1) of queries needs keys [start, r1) only.
    fn blocks(&self, b: usize) -> (usize, Vec<(usize, usize)>) {
        const ROWS: usize = 32;
        let t = self.mask.seq;
        let m = &self.mask.data[b * t..(b + 1) * t];
        let start = m.iter().position(|&x| x == 1).unwrap_or(t);
        let blocks = (start..t)
            .step_by(ROWS)
            .map(|r0| (r0, (r0 + ROWS).min(t)))
            .collect();
        (start, blocks)
    }

    /// P = masked softmax(Q Kᵀ·scale) for one (batch row, head), from contiguous (T×hd)
    /// blocks; only the causal blocks of scores are computed.
    fn probs(&self, qb: &[f32], kb: &[f32], b: usize, p: &mut [f32]) {
        let (t, hd) = (self.mask.seq, self.head_dim);
        let (start, blocks) = self.blocks(b);
        for &(r0, r1) in &blocks {
            // S[r0..r1, start..r1] = Q[r0..r1] · K[start..r1]ᵀ (Kᵀ: element (d, j) at j·hd + d).
            matmul(
                r1 - r0,
                r1 - start,
                hd,
                &mut p[r0 * t + start..],
                t,
                false,
                &qb[r0 * hd..],
                (hd, 1),
                &kb[start * hd..],
                (1, hd),
                gemm::Parallelism::None,
            );
            for i in r0..r1 {
                for v in &mut p[i * t + start..i * t + r1] {
                    *v *= self.scale;
                }
            }
        }
        self.softmax_rows(b, p);
    }

    /// Writes (T×hd) blocks, one per (b, head) in `blocks[b * n + head]`, into (B, T, n, hd).
    fn scatter<'a>(&self, n: usize, block: impl Fn(usize, usize) -> &'a [f32] + Sync) -> Vec<f32> {
        let (bsz, t, hd) = (self.mask.batch, self.mask.seq, self.head_dim);
        let mut out = vec![0f32; bsz * t * n * hd];
        out.par_chunks_mut(n * hd)
            .enumerate()
            .for_each(|(bt, row)| {
                let (b, i) = (bt / t, bt % t);
                for h in 0..n {
                    row[h * hd..(h + 1) * hd].copy_from_slice(&block(b, h)[i * hd..(i + 1) * hd]);
                }
            });
        out
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.dims(ql, self.heads)?;
        self.dims(kl, self.kv_heads)?;
        self.dims(vl, self.kv_heads)?;
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            bail!(
                "attention: {} heads over {} kv heads",
                self.heads,
                self.kv_heads
            );
        }
        if let Some(r) = &self.rope {
            if r.rows != self.mask.batch * self.mask.seq || 2 * r.half != self.head_dim {
                bail!("attention: RoPE tables do not match the input");
            }
        }
        let dtype = qs.dtype();
        let (q, k, v) = (as_f32(qs, ql)?, as_f32(ks, kl)?, as_f32(vs, vl)?);
        let (bsz, t, nh, nkv, hd) = (
            self.mask.batch,
            self.mask.seq,
            self.heads,
            self.kv_heads,
            self.head_dim,
        );
        let rep = nh / nkv;
        // One (t×hd) output block per (b, h), written into (B, T, nh, hd) afterwards.
        let blocks: Vec<Vec<f32>> = (0..bsz * nh)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / nh, bh % nh);
                let qb = self.gather(&q, nh, b, h, true);
                let kb = self.gather(&k, nkv, b, h / rep, true);
                let mut p = vec![0f32; t * t];
                self.probs(&qb, &kb, b, &mut p);
                let mut o = vec![0f32; t * hd];
                let (start, blocks) = self.blocks(b);
                let v0 = b * t * nkv * hd + (h / rep) * hd;
                for &(r0, r1) in &blocks {
                    // O[r0..r1] = P[r0..r1, start..r1] · V[start..r1]
                    matmul(
                        r1 - r0,
                        hd,
                        r1 - start,
                        &mut o[r0 * hd..],
                        hd,
                        false,
                        &p[r0 * t + start..],
                        (t, 1),
                        &v[v0 + start * nkv * hd..],
                        (nkv * hd, 1),
                        gemm::Parallelism::None,
                    );
                }
                o
            })
            .collect();
        let out = self.scatter(nh, |b, h| &blocks[b * nh + h]);
        Ok((from_f32(out, dtype)?, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        cpu_f32!(q => qv);
        cpu_f32!(k => kv);
        cpu_f32!(v => vv);
        cpu_f32!(res => o);
        cpu_f32!(grad => dout);
        let (bsz, t, nh, nkv, hd) = (
            self.mask.batch,
            self.mask.seq,
            self.heads,
            self.kv_heads,
            self.head_dim,
        );
        let rep = nh / nkv;
        // Work per (b, kv head): its `rep` query heads share K and V, so dK and dV are summed
        // there without races. Results are (t×hd) blocks, rotated back (the transpose of
        // RoPE) and scattered afterwards.
        type Blocks = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
        let per: Vec<Blocks> = (0..bsz * nkv)
            .into_par_iter()
            .map(|bk| {
                let (b, kh) = (bk / nkv, bk % nkv);
                let kb = self.gather(&kv, nkv, b, kh, true);
                let v0 = b * t * nkv * hd + kh * hd;
                let mut dk = vec![0f32; t * hd];
                let mut dv = vec![0f32; t * hd];
                let mut dqs = Vec::with_capacity(rep);
                let mut p = vec![0f32; t * t];
                let mut dp = vec![0f32; t * t];
                let (start, blocks) = self.blocks(b);
                for h in kh * rep..(kh + 1) * rep {
                    let q0 = b * t * nh * hd + h * hd;
                    let qb = self.gather(&qv, nh, b, h, true);
                    self.probs(&qb, &kb, b, &mut p);
                    for &(r0, r1) in &blocks {
                        let (m, n) = (r1 - r0, r1 - start);
                        // dV[start..r1] += P[r0..r1, start..r1]ᵀ dO[r0..r1]
                        matmul(
                            n,
                            hd,
                            m,
                            &mut dv[start * hd..],
                            hd,
                            true,
                            &p[r0 * t + start..],
                            (1, t),
                            &dout[q0 + r0 * nh * hd..],
                            (nh * hd, 1),
                            gemm::Parallelism::None,
                        );
                        // dP[r0..r1, start..r1] = dO[r0..r1] V[start..r1]ᵀ
                        matmul(
                            m,
                            n,
                            hd,
                            &mut dp[r0 * t + start..],
                            t,
                            false,
                            &dout[q0 + r0 * nh * hd..],
                            (nh * hd, 1),
                            &vv[v0 + start * nkv * hd..],
                            (1, nkv * hd),
                            gemm::Parallelism::None,
                        );
                    }
                    // dS = P ∘ (dP − rowsum(dO ∘ O)) · scale, over the computed blocks
                    // (P is zero past the diagonal, so dS is too).
                    for &(r0, r1) in &blocks {
                        for i in r0..r1 {
                            let r = q0 + i * nh * hd;
                            let di: f32 = (0..hd).map(|d| dout[r + d] * o[r + d]).sum();
                            let (pr, dr) = (&p[i * t..(i + 1) * t], &mut dp[i * t..(i + 1) * t]);
                            for j in start..r1 {
                                dr[j] = pr[j] * (dr[j] - di) * self.scale;
                            }
                        }
                    }
                    let mut dq = vec![0f32; t * hd];
                    for &(r0, r1) in &blocks {
                        let (m, n) = (r1 - r0, r1 - start);
                        // dQ[r0..r1] = dS[r0..r1, start..r1] K[start..r1]
                        matmul(
                            m,
                            hd,
                            n,
                            &mut dq[r0 * hd..],
                            hd,
                            false,
                            &dp[r0 * t + start..],
                            (t, 1),
                            &kb[start * hd..],
                            (hd, 1),
                            gemm::Parallelism::None,
                        );
                        // dK[start..r1] += dS[r0..r1, start..r1]ᵀ Q[r0..r1]
                        matmul(
                            n,
                            hd,
                            m,
                            &mut dk[start * hd..],
                            hd,
                            true,
                            &dp[r0 * t + start..],
                            (1, t),
                            &qb[r0 * hd..],
                            (hd, 1),
                            gemm::Parallelism::None,
                        );
                    }
                    self.rotate(&mut dq, b, true);
                    dqs.push(dq);
                }
                self.rotate(&mut dk, b, true);
                (dqs, dk, dv)
            })
            .collect();
        let dq = self.scatter(nh, |b, h| &per[b * nkv + h / rep].0[h % rep]);
        let dk = self.scatter(nkv, |b, kh| &per[b * nkv + kh].1);
        let dv = self.scatter(nkv, |b, kh| &per[b * nkv + kh].2);
        Ok((
            Some(tensor_from(dq, q)?),
            Some(tensor_from(dk, k)?),
            Some(tensor_from(dv, v)?),
        ))
    }
}

/// Causal attention of `q` (B, T, heads, hd) over `k`, `v` (B, T, kv_heads, hd), masked per
/// row by `mask`, scaled by `1/sqrt(hd)`; with `rope`, q and k are rotated first (inside the
/// kernel: `attention(q, k, v, m, Some(t))` = `attention(rope(q, t), rope(k, t), v, m, None)`).
/// Returns (B, T, heads, hd). Query rows with no real key (padding before a row's first
/// token) get zeros.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &KeyMask,
    rope: Option<&RopeTables>,
) -> Result<Tensor> {
    let (_, _, heads, _) = q.dims4()?;
    attention_flat(q, k, v, (heads, k.dim(2)?), mask, rope)
}

/// [`attention`] for `q` (B, T, heads·hd) and `k`, `v` (B, T, kv_heads·hd), heads side by
/// side, as the projections give them; returns (B, T, heads·hd), as the output projection
/// takes it (4-d inputs work too and give a 4-d output). The decoder's path: no reshape nodes
/// around the op, each of which would cost a full-size gradient copy in candle's backward pass.
pub fn attention_flat(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (heads, kv_heads): (usize, usize),
    mask: &KeyMask,
    rope: Option<&RopeTables>,
) -> Result<Tensor> {
    let width = q.dims().iter().skip(2).product::<usize>();
    if heads == 0 || !width.is_multiple_of(heads) {
        bail!(
            "attention: {:?} does not split into {heads} heads",
            q.shape()
        );
    }
    let hd = width / heads;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            mask: mask.clone(),
            heads,
            kv_heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            rope: rope.cloned(),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Dropout
// ---------------------------------------------------------------------------------------------

struct Dropout {
    mask: DropMask,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
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
    keep: Arc<Vec<u64>>,
    scale: f32,
}

impl DropMask {
    /// `x ⊙ mask · scale`, element-wise over a flat slice of the mask's length.
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        // Branch-free, collected in place (an indexed iterator: no zeroing pass first).
        x.par_iter()
            .enumerate()
            .map(|(i, x)| x * ((self.keep[i / 64] >> (i % 64) & 1) as f32 * self.scale))
            .collect()
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

    /// `y (+)= x ⊙ mask · scale`.
    fn apply_into(&self, x: &[f32], y: &mut [f32], accumulate: bool) {
        y.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .enumerate()
            .for_each(|(c, (y, x))| {
                let w0 = c * (1 << 14) / 64;
                for (i, (y, x)) in y.iter_mut().zip(x).enumerate() {
                    let keep = (self.keep[w0 + i / 64] >> (i % 64) & 1) as f32;
                    let v = x * (keep * self.scale);
                    *y = if accumulate { *y + v } else { v };
                }
            });
    }
}

/// Draws a [`DropMask`] for `n` elements: one `f64` per element from `rng`, in order, dropped
/// when below `p`. ChaCha is counter-based, so chunks of the mask are drawn in parallel by
/// seeking to their word position; `rng` ends where the sequential draws would leave it.
pub fn dropout_mask(n: usize, p: f64, rng: &mut rand_chacha::ChaCha8Rng) -> Result<DropMask> {
    use rand::RngCore;
    if !(0.0..1.0).contains(&p) {
        bail!("dropout probability {p} outside [0, 1)");
    }
    let base = rng.get_word_pos();
    let start = rng.clone();
    // Elements per parallel chunk: whole words of the bit mask.
    const CHUNK: usize = 1 << 14;
    let mut keep = vec![0u64; n.div_ceil(64)];
    keep.par_chunks_mut(CHUNK / 64)
        .enumerate()
        .for_each(|(c, words)| {
            let mut r = start.clone();
            let e0 = c * CHUNK;
            // Each f64 draw is one next_u64: two 32-bit words.
            r.set_word_pos(base + 2 * e0 as u128);
            for e in e0..(e0 + CHUNK).min(n) {
                // rand's Standard f64: the top 53 bits, scaled to [0, 1).
                let u = (r.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                if u >= p {
                    words[(e - e0) / 64] |= 1 << ((e - e0) % 64);
                }
            }
        });
    rng.set_word_pos(base + 2 * n as u128);
    Ok(DropMask {
        keep: Arc::new(keep),
        scale: (1.0 / (1.0 - p)) as f32,
    })
}

// ---------------------------------------------------------------------------------------------
// Attention over cached prefixes
// ---------------------------------------------------------------------------------------------

/// Attention of suffix rows over cached prompt prefixes and their own tokens (see
/// [`prefix_attention`]). One task per (row, kv head): its `rep` query heads form one
/// (rep·Ts × hd) block, so the prefix part is two matmuls per task with the prefix read in
/// place, forward and backward.
struct PrefixAttention {
    /// The suffixes' real tokens (n × Ts).
    mask: KeyMask,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Per prefix: keys (kv_heads, hd, Tp) and values (kv_heads, Tp, hd) as f32, and Tp.
    prefixes: Vec<(Vec<f32>, Vec<f32>, usize)>,
    /// Each suffix row's prefix.
    row_prefix: Vec<usize>,
}

/// What one (row, kv head) task of [`PrefixAttention`] reads: its queries (rep·Ts × hd,
/// head-major), its suffix keys and values (Ts × hd each) and its probabilities over
/// [prefix | suffix] keys (rep·Ts × Tk).
struct PrefixTask<'a> {
    qb: Vec<f32>,
    kb: Vec<f32>,
    vb: Vec<f32>,
    p: Vec<f32>,
    /// This task's prefix keys (hd × Tp) and values (Tp × hd).
    pk: &'a [f32],
    pv: &'a [f32],
    tp: usize,
}

impl PrefixAttention {
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Rows `(h, i)` of query heads `g·rep .. (g+1)·rep` of suffix row `r` of `x` (n, Ts, heads,
    /// hd), head-major: row (h, i) at (h·Ts + i)·hd. Queries, output gradients and outputs.
    fn gather_heads(&self, x: &[f32], r: usize, g: usize) -> Vec<f32> {
        let (ts, nh, hd) = (self.mask.seq, self.heads, self.head_dim);
        let rep = nh / self.kv_heads;
        let mut out = Vec::with_capacity(rep * ts * hd);
        for h in 0..rep {
            for i in 0..ts {
                let at = ((r * ts + i) * nh + g * rep + h) * hd;
                out.extend_from_slice(&x[at..at + hd]);
            }
        }
        out
    }

    /// kv head `g` of suffix row `r` of `x` (n, Ts, kv_heads, hd) as a (Ts × hd) block.
    fn gather_kv(&self, x: &[f32], r: usize, g: usize) -> Vec<f32> {
        let (ts, nkv, hd) = (self.mask.seq, self.kv_heads, self.head_dim);
        let mut out = Vec::with_capacity(ts * hd);
        for j in 0..ts {
            let at = ((r * ts + j) * nkv + g) * hd;
            out.extend_from_slice(&x[at..at + hd]);
        }
        out
    }

    /// Task (r, g)'s inputs and its probabilities: every prefix key and the row's real suffix
    /// keys `j <= i` for query `i`.
    fn task<'a>(
        &'a self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        r: usize,
        g: usize,
    ) -> PrefixTask<'a> {
        let (ts, hd) = (self.mask.seq, self.head_dim);
        let (pkf, pvf, tp) = &self.prefixes[self.row_prefix[r]];
        let tp = *tp;
        let pk = &pkf[g * hd * tp..(g + 1) * hd * tp];
        let pv = &pvf[g * tp * hd..(g + 1) * tp * hd];
        let qb = self.gather_heads(q, r, g);
        let (kb, vb) = (self.gather_kv(k, r, g), self.gather_kv(v, r, g));
        let rows = qb.len() / hd;
        let tk = tp + ts;
        // Scores: [prefix | suffix] per query row, (rows × Tk).
        let mut p = vec![0f32; rows * tk];
        matmul(
            rows,
            tp,
            hd,
            &mut p,
            tk,
            false,
            &qb,
            (hd, 1),
            pk,
            (tp, 1),
            gemm::Parallelism::None,
        );
        matmul(
            rows,
            ts,
            hd,
            &mut p[tp..],
            tk,
            false,
            &qb,
            (hd, 1),
            &kb,
            (1, hd),
            gemm::Parallelism::None,
        );
        let scale = self.scale();
        let m = &self.mask.data[r * ts..(r + 1) * ts];
        for row in 0..rows {
            let i = row % ts;
            let sr = &mut p[row * tk..(row + 1) * tk];
            let mut max = f32::NEG_INFINITY;
            for (j, x) in sr.iter_mut().enumerate() {
                let real = j < tp || (j - tp <= i && m[j - tp] == 1);
                if real {
                    *x *= scale;
                    max = max.max(*x);
                } else {
                    *x = f32::NEG_INFINITY;
                }
            }
            let mut sum = 0f32;
            for x in sr.iter_mut() {
                *x = if *x == f32::NEG_INFINITY {
                    0.0
                } else {
                    exp(*x - max)
                };
                sum += *x;
            }
            let inv = 1.0 / sum;
            for x in sr.iter_mut() {
                *x *= inv;
            }
        }
        PrefixTask {
            qb,
            kb,
            vb,
            p,
            pk,
            pv,
            tp,
        }
    }

    /// Per-task (rep·Ts × hd) blocks into (n, Ts, heads, hd).
    fn scatter_heads(&self, blocks: &[Vec<f32>]) -> Vec<f32> {
        let (n, ts, nh, nkv, hd) = (
            self.mask.batch,
            self.mask.seq,
            self.heads,
            self.kv_heads,
            self.head_dim,
        );
        let rep = nh / nkv;
        let mut out = vec![0f32; n * ts * nh * hd];
        for (task, o) in blocks.iter().enumerate() {
            let (r, g) = (task / nkv, task % nkv);
            for h in 0..rep {
                for i in 0..ts {
                    let src = (h * ts + i) * hd;
                    let dst = ((r * ts + i) * nh + g * rep + h) * hd;
                    out[dst..dst + hd].copy_from_slice(&o[src..src + hd]);
                }
            }
        }
        out
    }

    /// Per-task (Ts × hd) blocks into (n, Ts, kv_heads, hd).
    fn scatter_kv(&self, blocks: &[&[f32]]) -> Vec<f32> {
        let (n, ts, nkv, hd) = (self.mask.batch, self.mask.seq, self.kv_heads, self.head_dim);
        let mut out = vec![0f32; n * ts * nkv * hd];
        for (task, b) in blocks.iter().enumerate() {
            let (r, g) = (task / nkv, task % nkv);
            for j in 0..ts {
                let dst = ((r * ts + j) * nkv + g) * hd;
                out[dst..dst + hd].copy_from_slice(&b[j * hd..(j + 1) * hd]);
            }
        }
        out
    }
}

impl CustomOp3 for PrefixAttention {
    fn name(&self) -> &'static str {
        "prefix-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dtype = qs.dtype();
        let (q, k, v) = (as_f32(qs, ql)?, as_f32(ks, kl)?, as_f32(vs, vl)?);
        let (n, ts, nkv, hd) = (self.mask.batch, self.mask.seq, self.kv_heads, self.head_dim);
        let blocks: Vec<Vec<f32>> = (0..n * nkv)
            .into_par_iter()
            .map(|task| {
                let t = self.task((&q, &k, &v), task / nkv, task % nkv);
                let (rows, tk) = (t.qb.len() / hd, t.tp + ts);
                // Out = P_prefix · V_prefix + P_suffix · V_suffix.
                let mut o = vec![0f32; rows * hd];
                matmul(
                    rows,
                    hd,
                    t.tp,
                    &mut o,
                    hd,
                    false,
                    &t.p,
                    (tk, 1),
                    t.pv,
                    (hd, 1),
                    gemm::Parallelism::None,
                );
                matmul(
                    rows,
                    hd,
                    ts,
                    &mut o,
                    hd,
                    true,
                    &t.p[t.tp..],
                    (tk, 1),
                    &t.vb,
                    (hd, 1),
                    gemm::Parallelism::None,
                );
                o
            })
            .collect();
        let out = self.scatter_heads(&blocks);
        Ok((from_f32(out, dtype)?, ql.shape().clone()))
    }

    /// Gradients of the suffixes' q, k and v (the prefixes are constants: nothing trained acts
    /// on them), the probabilities recomputed per task as in [`Attention`]'s backward.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        cpu_f32!(q => qv);
        cpu_f32!(k => kv);
        cpu_f32!(v => vv);
        cpu_f32!(res => o);
        cpu_f32!(grad => dout);
        let (n, ts, nkv, hd) = (self.mask.batch, self.mask.seq, self.kv_heads, self.head_dim);
        let scale = self.scale();
        let per: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..n * nkv)
            .into_par_iter()
            .map(|task| {
                let (r, g) = (task / nkv, task % nkv);
                let t = self.task((&qv, &kv, &vv), r, g);
                let (rows, tp) = (t.qb.len() / hd, t.tp);
                let tk = tp + ts;
                let dob = self.gather_heads(&dout, r, g);
                let ob = self.gather_heads(&o, r, g);
                // dP = dO · [V_prefix | V_suffix]ᵀ (rows × Tk).
                let mut ds = vec![0f32; rows * tk];
                matmul(
                    rows,
                    tp,
                    hd,
                    &mut ds,
                    tk,
                    false,
                    &dob,
                    (hd, 1),
                    t.pv,
                    (1, hd),
                    gemm::Parallelism::None,
                );
                matmul(
                    rows,
                    ts,
                    hd,
                    &mut ds[tp..],
                    tk,
                    false,
                    &dob,
                    (hd, 1),
                    &t.vb,
                    (1, hd),
                    gemm::Parallelism::None,
                );
                // dS = P ∘ (dP − rowsum(dO ∘ O)) · scale.
                for row in 0..rows {
                    let d = &dob[row * hd..(row + 1) * hd];
                    let di: f32 = d
                        .iter()
                        .zip(&ob[row * hd..(row + 1) * hd])
                        .map(|(a, b)| a * b)
                        .sum();
                    let pr = &t.p[row * tk..(row + 1) * tk];
                    for (x, &p) in ds[row * tk..(row + 1) * tk].iter_mut().zip(pr) {
                        *x = p * (*x - di) * scale;
                    }
                }
                // dQ = dS_prefix · K_prefix + dS_suffix · K_suffix (K_prefix (j, d) at d·Tp + j).
                let mut dq = vec![0f32; rows * hd];
                matmul(
                    rows,
                    hd,
                    tp,
                    &mut dq,
                    hd,
                    false,
                    &ds,
                    (tk, 1),
                    t.pk,
                    (1, tp),
                    gemm::Parallelism::None,
                );
                matmul(
                    rows,
                    hd,
                    ts,
                    &mut dq,
                    hd,
                    true,
                    &ds[tp..],
                    (tk, 1),
                    &t.kb,
                    (hd, 1),
                    gemm::Parallelism::None,
                );
                // dK_suffix = dS_suffixᵀ · Q, dV_suffix = P_suffixᵀ · dO (summed over the
                // task's query heads).
                let mut dk = vec![0f32; ts * hd];
                matmul(
                    ts,
                    hd,
                    rows,
                    &mut dk,
                    hd,
                    false,
                    &ds[tp..],
                    (1, tk),
                    &t.qb,
                    (hd, 1),
                    gemm::Parallelism::None,
                );
                let mut dv = vec![0f32; ts * hd];
                matmul(
                    ts,
                    hd,
                    rows,
                    &mut dv,
                    hd,
                    false,
                    &t.p[tp..],
                    (1, tk),
                    &dob,
                    (hd, 1),
                    gemm::Parallelism::None,
                );
                (dq, dk, dv)
            })
            .collect();
        let dq: Vec<Vec<f32>> = per.iter().map(|x| x.0.clone()).collect();
        let dq = self.scatter_heads(&dq);
        let dk = self.scatter_kv(&per.iter().map(|x| x.1.as_slice()).collect::<Vec<_>>());
        let dv = self.scatter_kv(&per.iter().map(|x| x.2.as_slice()).collect::<Vec<_>>());
        Ok((
            Some(tensor_from(dq, q)?),
            Some(tensor_from(dk, k)?),
            Some(tensor_from(dv, v)?),
        ))
    }
}

/// Attention of suffix rows over cached prompt prefixes and their own tokens, on the CPU, with
/// its backward pass (into the suffixes' q, k and v; the prefixes are constants). The composed
/// reference is [`composed::prefix_attention`]. `q` (n, Ts, heads, hd), `k`, `v` (n, Ts,
/// kv_heads, hd), all after RoPE; `mask` (n × Ts) marks the suffixes' real tokens; `prefixes`
/// lists, in row order, each run of rows that continues one prefix: its keys (kv_heads, hd,
/// Tp) and values (kv_heads, Tp, hd) (all real) and the run's row count. Query `i` of a row
/// attends to every key of its prefix and to the row's real suffix keys `j <= i`.
pub fn prefix_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &KeyMask,
    prefixes: &[(&Tensor, &Tensor, usize)],
) -> Result<Tensor> {
    let (n, ts, nh, hd) = q.dims4()?;
    let nkv = k.dim(2)?;
    let rows: usize = prefixes.iter().map(|p| p.2).sum();
    let shapes_ok = prefixes.iter().all(|(pk, pv, _)| {
        let tp = pk.dims().get(2).copied().unwrap_or(0);
        tp > 0 && pk.dims() == [nkv, hd, tp] && pv.dims() == [nkv, tp, hd]
    });
    if (mask.batch, mask.seq) != (n, ts)
        || nkv == 0
        || nh % nkv != 0
        || k.dims() != [n, ts, nkv, hd]
        || v.dims() != k.dims()
        || rows != n
        || !shapes_ok
    {
        bail!(
            "prefix attention: q {:?}, k {:?}, v {:?}, mask {}x{}, {} prefixes over {rows} rows",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.batch,
            mask.seq,
            prefixes.len()
        );
    }
    let flat =
        |x: &Tensor| -> Result<Vec<f32>> { x.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
    let mut row_prefix = Vec::with_capacity(n);
    let mut kept = Vec::with_capacity(prefixes.len());
    for (p, (pk, pv, count)) in prefixes.iter().enumerate() {
        kept.push((flat(pk)?, flat(pv)?, pk.dim(2)?));
        row_prefix.extend(std::iter::repeat_n(p, *count));
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        PrefixAttention {
            mask: mask.clone(),
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            prefixes: kept,
            row_prefix,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Frozen linear
// ---------------------------------------------------------------------------------------------

struct FrozenLinear {
    /// (out, in), in the compute dtype; never receives a gradient.
    w: Tensor,
    b: Option<Tensor>,
    /// The LoRA path's scaling and dropout mask, when the op has one (inputs x, A, B).
    lora: Option<(f32, Option<DropMask>)>,
}

/// A LoRA path for [`linear`]: `scaling · dropout(x) Aᵀ Bᵀ`, with `A` (r, in) and `B` (out, r)
/// and the dropout mask drawn beforehand ([`dropout_mask`]; `None` when not training).
pub struct LoraPath<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f64,
    pub dropout: Option<DropMask>,
}

/// `x` as f32 with a LoRA dropout mask applied (borrowed when there is none).
fn dropped<'a>(x: &'a [f32], mask: &Option<DropMask>) -> Cow<'a, [f32]> {
    match mask {
        Some(m) => Cow::Owned(m.apply(x)),
        None => Cow::Borrowed(x),
    }
}

impl FrozenLinear {
    /// The LoRA path's low-rank activations `scaling · dropout(x) Aᵀ` (n×r) for `x` (n×in).
    fn low(&self, xd: &[f32], a: &[f32], n: usize, r: usize, scaling: f32) -> Vec<f32> {
        let fan_in = xd.len() / n.max(1);
        // low (n×r) = xd (n×in) · Aᵀ (in×r: element (i, k) at k·in + i)
        let mut low = matmul_new(
            (n, r, fan_in),
            (xd, (fan_in, 1)),
            (a, (1, fan_in)),
            pool_parallelism(),
        );
        low.iter_mut().for_each(|v| *v *= scaling);
        low
    }

    /// `x Wᵀ (+ b) (+ scaling · dropout(x) Aᵀ Bᵀ)`.
    fn run(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        lora: Option<(&CpuStorage, &Layout, &CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let dtype = x.dtype();
        let xs = as_f32(x, xl)?;
        let (fan_out, fan_in) = self.w.dims2()?;
        let dims = xl.shape().dims();
        if dims.last() != Some(&fan_in) {
            bail!("linear: input {dims:?} for a weight of ({fan_out}, {fan_in})");
        }
        let n = xs.len() / fan_in;
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(wc) = &*ws else {
            bail!("linear: CPU weight expected");
        };
        let w = as_f32(wc, wl)?;
        // y (n×out) = x (n×in) · Wᵀ (in×out: element (i, o) at o·in + i)
        let mut y = matmul_new(
            (n, fan_out, fan_in),
            (&xs, (fan_in, 1)),
            (&w, (1, fan_in)),
            pool_parallelism(),
        );
        if let (Some((as_, al, bs, bl)), Some((scaling, mask))) = (lora, &self.lora) {
            let a = as_f32(as_, al)?;
            let bm = as_f32(bs, bl)?;
            let r = bl.shape().dims().last().copied().unwrap_or(0);
            if a.len() != r * fan_in || bm.len() != fan_out * r {
                bail!(
                    "linear: LoRA factors A {:?} and B {:?} for a weight of ({fan_out}, {fan_in})",
                    al.shape(),
                    bl.shape()
                );
            }
            if let Some(m) = mask {
                if m.keep.len() != xs.len().div_ceil(64) {
                    bail!("linear: a dropout mask for another input size");
                }
            }
            let low = self.low(&dropped(&xs, mask), &a, n, r, *scaling);
            // y += low (n×r) · Bᵀ (r×out: element (k, o) at o·r + k)
            matmul(
                n,
                fan_out,
                r,
                &mut y,
                fan_out,
                true,
                &low,
                (r, 1),
                &bm,
                (1, r),
                pool_parallelism(),
            );
        }
        if let Some(b) = &self.b {
            cpu_f32!(b => bv);
            y.par_chunks_mut(fan_out).for_each(|row| {
                for (y, b) in row.iter_mut().zip(bv.iter()) {
                    *y += b;
                }
            });
        }
        let mut out = dims.to_vec();
        *out.last_mut().expect("rank > 0") = fan_out;
        Ok((from_f32(y, dtype)?, Shape::from(out)))
    }

    /// `grad (…, out) · W` as f32 (n×in); computed in f32 like the forward pass (candle's CPU
    /// matmul has no fast bf16 kernel).
    fn grad_x(&self, g: &[f32], x: &Tensor) -> Result<Vec<f32>> {
        let (fan_out, fan_in) = self.w.dims2()?;
        cpu_f32!(self.w => w);
        let n = g.len() / fan_out;
        if n * fan_in != x.elem_count() {
            bail!(
                "linear: a gradient of {} for input {:?}",
                g.len(),
                x.shape()
            );
        }
        // dx (n×in) = g (n×out) · W (out×in)
        Ok(matmul_new(
            (n, fan_in, fan_out),
            (g, (fan_out, 1)),
            (&w, (fan_in, 1)),
            pool_parallelism(),
        ))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "fused-frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l, None)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        cpu_f32!(grad => g);
        Ok(Some(tensor_from(self.grad_x(&g, x)?, x)?))
    }
}

impl CustomOp3 for FrozenLinear {
    fn name(&self) -> &'static str {
        "fused-frozen-linear-lora"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(s, l, Some((a, al, b, bl)))
    }

    /// With `gl = scaling · g B` (n×r) and `xd = dropout(x)`: `dx = g W + dropout(gl A)` (the
    /// same mask), `dA = glᵀ xd`, `dB = gᵀ low` with `low = scaling · xd Aᵀ` recomputed (n×r:
    /// cheaper than keeping it).
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some((scaling, mask)) = &self.lora else {
            bail!("linear: a LoRA op without its scaling");
        };
        let (fan_out, fan_in) = self.w.dims2()?;
        let r = b.dim(1)?;
        cpu_f32!(grad => g);
        cpu_f32!(a => av);
        cpu_f32!(b => bv);
        let n = g.len() / fan_out;
        // gl (n×r) = scaling · g (n×out) · B (out×r)
        let mut gl = matmul_new(
            (n, r, fan_out),
            (&g, (fan_out, 1)),
            (&bv, (r, 1)),
            pool_parallelism(),
        );
        gl.iter_mut().for_each(|v| *v *= scaling);
        let gx = if x.track_op() {
            let mut dx = self.grad_x(&g, x)?;
            // t (n×in) = gl (n×r) · A (r×in), through the mask into dx.
            match mask {
                None => matmul(
                    n,
                    fan_in,
                    r,
                    &mut dx,
                    fan_in,
                    true,
                    &gl,
                    (r, 1),
                    &av,
                    (fan_in, 1),
                    pool_parallelism(),
                ),
                Some(m) => {
                    let t = matmul_new(
                        (n, fan_in, r),
                        (&gl, (r, 1)),
                        (&av, (fan_in, 1)),
                        pool_parallelism(),
                    );
                    m.apply_into(&t, &mut dx, true);
                }
            }
            Some(tensor_from(dx, x)?)
        } else {
            None
        };
        let (ga, gb) = if a.track_op() || b.track_op() {
            cpu_f32!(x => xv);
            let xd = dropped(&xv, mask);
            let ga = if a.track_op() {
                // dA (r×in) = glᵀ (r×n: element (k, i) at i·r + k) · xd (n×in)
                let da = matmul_new(
                    (r, fan_in, n),
                    (&gl, (1, r)),
                    (&xd, (fan_in, 1)),
                    pool_parallelism(),
                );
                Some(tensor_from(da, a)?)
            } else {
                None
            };
            let gb = if b.track_op() {
                let low = self.low(&xd, &av, n, r, *scaling);
                // dB (out×r) = gᵀ (out×n: element (o, i) at i·out + o) · low (n×r)
                let db = matmul_new(
                    (fan_out, r, n),
                    (&g, (1, fan_out)),
                    (&low, (r, 1)),
                    pool_parallelism(),
                );
                Some(tensor_from(db, b)?)
            } else {
                None
            };
            (ga, gb)
        } else {
            (None, None)
        };
        Ok((gx, ga, gb))
    }
}

/// `x Wᵀ (+ b) (+ scaling · dropout(x) Aᵀ Bᵀ)` for a frozen `w` (out, in) and bias `b`: `x`
/// is (…, in) and the output (…, out), so no reshape enters the graph. The backward pass
/// computes no gradient for `w`, and gradients for `x` and the LoRA path's `A` and `B` where
/// they are tracked; neither the dropped-out input nor the full-width LoRA term is ever
/// stored (the mask is kept as bits).
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    lora: Option<LoraPath>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    match lora {
        Some(l) => {
            let (r, fan_in) = l.a.dims2()?;
            if l.b.dims2()?.1 != r || fan_in != w.dim(1)? {
                bail!(
                    "linear: LoRA A {:?} and B {:?} for a weight {:?}",
                    l.a.shape(),
                    l.b.shape(),
                    w.shape()
                );
            }
            let op = FrozenLinear {
                w: w.contiguous()?,
                b: b.cloned(),
                lora: Some((l.scaling as f32, l.dropout)),
            };
            x.apply_op3(&l.a.contiguous()?, &l.b.contiguous()?, op)
        }
        None => x.apply_op1(FrozenLinear {
            w: w.contiguous()?,
            b: b.cloned(),
            lora: None,
        }),
    }
}

/// The same operations composed of plain candle ops with candle's own backward passes: the
/// reference the fused ops are tested against, and the path on devices without fused kernels.
pub mod composed {
    use super::KeyMask;
    use candle_core::{DType, Result, Tensor, D};

    pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        // As transformers: normalise in f32, scale in the compute dtype.
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf
            .broadcast_div(&(ms + eps)?.sqrt()?)?
            .to_dtype(x.dtype())?;
        y.broadcast_mul(w)
    }

    /// `x` (B, T, heads, hd); `cos`, `sin` (B, T, 1, hd) with both halves filled.
    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
    }

    pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        gate.silu()? * up
    }

    /// Additive bias (B, 1, T, T): causal and key padding, large and finite. Built on the
    /// device from the (B, T) key mask and a causal triangle: only B·T values are uploaded.
    pub fn attention_bias(
        mask: &KeyMask,
        dtype: DType,
        dev: &candle_core::Device,
    ) -> Result<Tensor> {
        let (b, t) = (mask.batch, mask.seq);
        let keys: Vec<f32> = mask.data.iter().map(|&m| m as f32).collect();
        let keys = Tensor::from_vec(keys, (b, 1, 1, t), dev)?;
        let causal = Tensor::tril2(t, DType::F32, dev)?.reshape((1, 1, t, t))?;
        // 1 where attending is allowed → 0; 0 → −1e9.
        causal
            .broadcast_mul(&keys)?
            .affine(1e9, -1e9)?
            .to_dtype(dtype)
    }

    /// `q` (B, T, heads, hd), `k`, `v` (B, T, kv_heads, hd) → (B, T, heads, hd).
    /// Attention of one query per row, `q` (B, 1, heads, hd), over `k`, `v` (B, T, kv_heads,
    /// hd) with an additive `bias` (B, 1, 1, T); returns (B, 1, heads·hd). What the last
    /// block needs when only one position per row is read ([`crate::Decoder::forward_at`]):
    /// B·heads·T scores, small enough for plain candle ops and their backward.
    pub fn attention_rows(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, _, nh, hd) = q.dims4()?;
        let nkv = k.dim(2)?;
        // Query head h = g·rep + i reads kv head g: (B, nkv, rep, hd) against (B, nkv, T, hd).
        let q = q.reshape((b, nkv, nh / nkv, hd))?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(bias)?;
        let att = candle_nn::ops::softmax(&scores, D::Minus1)?;
        att.matmul(&v)?.reshape((b, 1, nh * hd))
    }

    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, t, nh, hd) = q.dims4()?;
        let nkv = k.dim(2)?;
        let q = q.transpose(1, 2)?.contiguous()?;
        let expand = |x: &Tensor| -> Result<Tensor> {
            let x = x.transpose(1, 2)?.contiguous()?;
            if nh == nkv {
                return Ok(x);
            }
            x.unsqueeze(2)?
                .broadcast_as((b, nkv, nh / nkv, t, hd))?
                .reshape((b, nh, t, hd))
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(bias)?;
        let att = candle_nn::ops::softmax(&scores, D::Minus1)?;
        att.matmul(&v)?.transpose(1, 2)
    }

    /// Attention of `n` suffix rows over one shared prefix and their own tokens, in candle
    /// ops (the reference for [`super::prefix_attention`], and the path on other devices):
    /// `q`, `k`, `v` (n, Ts, heads | kv_heads, hd), `bias` (n, 1, Ts, Ts) for the suffix keys,
    /// `pk` (kv_heads, hd, Tp) and `pv` (kv_heads, Tp, hd) the prefix's (every prefix key is
    /// real). The prefix is read in place by all `n` rows (one matmul over n·Ts queries per kv
    /// head), never copied per row. → (n, Ts, heads, hd).
    pub fn prefix_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        pk: &Tensor,
        pv: &Tensor,
    ) -> Result<Tensor> {
        let (n, ts, nh, hd) = q.dims4()?;
        let nkv = k.dim(2)?;
        let rep = nh / nkv;
        let tp = pk.dim(2)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // Prefix scores: q as (kv_heads, rep·n·Ts, hd) against (kv_heads, hd, Tp).
        let qh = q.permute((2, 0, 1, 3))?.contiguous()?; // (nh, n, Ts, hd)
        let sp = (qh.reshape((nkv, rep * n * ts, hd))?.matmul(pk)? * scale)?
            .reshape((nh, n, ts, tp))?
            .permute((1, 0, 2, 3))?; // (n, nh, Ts, Tp)
                                     // Suffix scores, as the composed attention.
        let qs = qh.permute((1, 0, 2, 3))?; // (n, nh, Ts, hd)
        let expand = |x: &Tensor| -> Result<Tensor> {
            let x = x.transpose(1, 2)?.contiguous()?; // (n, nkv, Ts, hd)
            if rep == 1 {
                return Ok(x);
            }
            x.unsqueeze(2)?
                .broadcast_as((n, nkv, rep, ts, hd))?
                .reshape((n, nh, ts, hd))
        };
        let (ks, vs) = (expand(k)?, expand(v)?);
        let ss = (qs.contiguous()?.matmul(&ks.t()?)? * scale)?.broadcast_add(bias)?;
        // `softmax`, not the fused `softmax_last_dim`: this one has a backward pass.
        let att = candle_nn::ops::softmax(&Tensor::cat(&[&sp.contiguous()?, &ss], 3)?, D::Minus1)?;
        let ap = att.narrow(3, 0, tp)?; // (n, nh, Ts, Tp)
        let as_ = att.narrow(3, tp, ts)?.contiguous()?;
        let op = ap
            .permute((1, 0, 2, 3))?
            .contiguous()?
            .reshape((nkv, rep * n * ts, tp))?
            .matmul(pv)?
            .reshape((nh, n, ts, hd))?
            .permute((1, 2, 0, 3))?; // (n, Ts, nh, hd)
        let os = as_.matmul(&vs)?.transpose(1, 2)?; // (n, Ts, nh, hd)
        op + os
    }
}
