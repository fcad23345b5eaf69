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
//! Fewer, larger ops matter beyond their own loops: every tensor between two ops is a gradient
//! candle's backward pass allocates and keeps, and one read by several ops (the normed input of
//! q, k and v; the residual stream) costs a full-size add per extra reader, on one thread. (With
//! candle as released, every edge cost a zeros-and-add; `vendor/candle-core` stores the first
//! gradient instead.)
//!
//! Every op is checked against [`composed`] (forward and gradients) and by finite differences in
//! `tests/fused_ops.rs`. Only the CPU has these kernels; on other devices the decoder takes the
//! composed path (`Decoder::set_fused`). Tensors are f32 or bf16; bf16 is computed in f32.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor,
};
use half::bf16 as half_bf16;
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Arc;

use super::Mask;

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
            v.into_par_iter().map(half_bf16::from_f32).collect(),
        )),
        d => bail!("fused op: f32 or bf16 expected, got {d:?}"),
    }
}

/// Rounds through `dtype` (identity for f32), as a composed op in that dtype would.
#[inline]
fn round(x: f32, dtype: DType) -> f32 {
    if dtype == DType::BF16 {
        half_bf16::from_f32(x).to_f32()
    } else {
        x
    }
}

/// Tests only: every [`avx512_dispatch!`] function runs its AVX2 build while set.
#[cfg(test)]
static NARROW: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Do the [`avx512_dispatch!`] functions run their AVX-512F build? (The CPU has it.)
#[inline]
fn wide_lanes() -> bool {
    #[cfg(test)]
    if NARROW.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    std::is_x86_feature_detected!("avx512f")
}

/// `fn $name(args) { body }` whose body runs compiled for AVX-512F where the CPU has it, and
/// for the build's target (AVX2) otherwise: for element-wise loops (exponentials above all),
/// which then run in 16 lanes instead of 8. Rust neither contracts `a·b + c` into FMA nor
/// reorders sums, so both give the same values (the reductions of [`lanes`] keep their 8
/// lanes). The arguments are passed on as they are; the function returns nothing. (The LoRA
/// path's row loops measured slower this way: they stay AVX2.)
macro_rules! avx512_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn inner($($arg: $ty),*) $body
            #[target_feature(enable = "avx512f")]
            unsafe fn wide($($arg: $ty),*) {
                inner($($arg),*)
            }
            if wide_lanes() {
                // SAFETY: the CPU has AVX-512F (checked).
                unsafe { wide($($arg),*) }
            } else {
                inner($($arg),*)
            }
        }
    };
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
    // 2ⁿ from its exponent bits: n + 127 (an integer in [1, 254]) added to 1.5·2²³ sits in the
    // mantissa's low bits, read back as an integer; the same value as `(n as i32 + 127) << 23`
    // but without a saturating float → int cast, so the loops around it stay vectorized.
    let biased = (n + (127.0 + 12_582_912.0)).to_bits() - 0x4B40_0000;
    y * f32::from_bits(biased << 23)
}

/// A tensor shaped and typed like `like` from f32 values (converted in parallel for bf16).
fn tensor_from(v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    match like.dtype() {
        DType::BF16 => {
            let h: Vec<half_bf16> = v.into_par_iter().map(half_bf16::from_f32).collect();
            Tensor::from_vec(h, like.shape(), like.device())
        }
        _ => Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(like.dtype()),
    }
}

fn pool_parallelism() -> ::gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => ::gemm::Parallelism::None,
        n => ::gemm::Parallelism::Rayon(n),
    }
}

mod attention;
pub mod bf16;
mod dropout;
mod gemm;
mod heads;
mod lanes;
mod linear;
mod mlp;
mod norm;
mod prefix;
mod rope;
pub mod times;

pub use attention::{attention, attention_flat};
pub use dropout::{dropout, dropout_mask, DropMask};
pub use gemm::gemm_gflops;
use gemm::{matmul, matmul_new, transpose};
use heads::{masked_softmax, softmax_runs, Heads};
use lanes::{lane_dot, lane_dot3, lane_max, lane_sum};
pub use linear::{linear, linear_weight, LoraPath};
pub use mlp::{mlp, mlp_weights, swiglu};
pub use norm::rms_norm;
pub use prefix::prefix_attention;
pub use rope::{rope, RopeTables};

/// Elements per parallel task of the element-wise loops.
const CHUNK: usize = 4096;
/// Elements per parallel task of the dropout masks (whole 64-bit words of the bit mask).
const MASK_CHUNK: usize = 1 << 14;

#[cfg(test)]
mod tests {
    use super::exp;
    use super::*;
    use crate::ops::{KernelChoice, Weight};
    use candle_core::{Device, Var};

    /// Every [`avx512_dispatch!`] function (and attention's softmax) gives its AVX2 build's
    /// values bit for bit: a LoRA projection with dropout feeding the MLP on the emulated bf16
    /// kernel (SwiGLU and its gradient) and masked attention (the softmax), forward and
    /// backward, run both ways.
    #[test]
    fn the_avx512_builds_of_the_element_wise_loops_give_the_same_values() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU lacks AVX-512F");
            return;
        }
        let dev = Device::Cpu;
        let randn = |shape: &[usize], seed: u64| {
            let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
            let n = shape.iter().product::<usize>();
            let v: Vec<f32> = (0..n)
                .map(|_| rand::Rng::gen_range(&mut rng, -1.0f32..1.0))
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let (b, t, h, heads, inter, r) = (2, 21, 48, 3, 70, 4);
        let x = Var::from_tensor(&randn(&[b, t, h], 1)).unwrap();
        let a = Var::from_tensor(&(randn(&[r, h], 2) * 0.3).unwrap()).unwrap();
        let bm = Var::from_tensor(&(randn(&[h, r], 3) * 0.3).unwrap()).unwrap();
        let w = Weight::plain(&randn(&[h, h], 4)).unwrap();
        let emulated = KernelChoice::all(bf16::Kernel::Emulated);
        let mlp_w: Vec<Weight> = [(inter, h, 5), (inter, h, 6), (h, inter, 7)]
            .iter()
            .map(|&(o, i, seed)| {
                Weight::new(&(randn(&[o, i], seed) * 0.2).unwrap(), emulated).unwrap()
            })
            .collect();
        let mask = Mask::left_padded(&[17, 21], t);
        let run = || {
            let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(9);
            let drop = dropout_mask(b * t * h, 0.3, &mut rng).unwrap();
            let lora = LoraPath {
                a: a.as_tensor(),
                b: bm.as_tensor(),
                scaling: 2.0,
                dropout: Some(drop),
            };
            let y = linear_weight(x.as_tensor(), &w, None, Some(lora)).unwrap();
            let y = mlp_weights(&y, &mlp_w[0], &mlp_w[1], &mlp_w[2]).unwrap();
            let y =
                attention_flat(&y, &y, &y, (heads, heads), &mask, None, bf16::Kernel::F32).unwrap();
            let grads = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            let mut out = vec![bits(&y)];
            for v in [&x, &a, &bm] {
                out.push(bits(grads.get(v.as_tensor()).unwrap()));
            }
            out
        };
        let wide = run();
        NARROW.store(true, std::sync::atomic::Ordering::Relaxed);
        let narrow = run();
        NARROW.store(false, std::sync::atomic::Ordering::Relaxed);
        for (i, (w, n)) in wide.iter().zip(&narrow).enumerate() {
            assert!(
                w == n,
                "output {i} differs between the AVX-512 and AVX2 builds"
            );
        }
    }

    #[test]
    fn exp_is_within_2e7_of_std_and_clamps() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 2e-7, "relative error {worst}");
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert_eq!(exp(1000.0), exp(88.0));
        assert_eq!(exp(0.0), 1.0);
    }
}
