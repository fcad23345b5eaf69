//! The decoder's operations, each choosing its implementation by device (and the
//! [`Backend`] override that tests and benchmarks set):
//!
//! - [`cpu`]: one candle custom op per kernel family, each with its own backward pass, on
//!   rayon's pool (f32 or bf16, computed in f32): what the CPU runs;
//! - [`reference`]: the same maths composed of plain candle ops and their backward passes:
//!   what the CPU kernels are tested against, and what other devices (CUDA) run.
//!
//! The decoder calls only the functions here ([`rms_norm`], [`attention`],
//! [`prefix_attention`], [`attention_at`], [`linear`], [`mlp`], [`swiglu`], [`rope`]) with the
//! pass's [`Positions`] (mask, position ids, RoPE tables) and never branches on the backend.
//! A new kernel family (a CUDA kernel, a low-precision weight format) is a new module here and
//! a new arm in the functions below.

pub mod cpu;
mod mask;
pub mod reference;
mod weight;

pub use cpu::bf16::{kernel_choice, Kernel, KernelChoice};
pub use mask::{Mask, Positions};
pub use weight::Weight;

use candle_core::{DType, Device, Result, Tensor};
use collm_nn::TrainCtx;

/// Which implementation the ops run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The CPU kernels on the CPU, the reference ops elsewhere.
    #[default]
    Auto,
    /// The CPU kernels ([`cpu`]); CPU tensors only.
    Cpu,
    /// The composed candle ops ([`reference`]), on any device.
    Reference,
}

impl Backend {
    /// Does this choice run the CPU kernels on `device`?
    pub fn kernels(self, device: &Device) -> bool {
        match self {
            Backend::Auto => device.is_cpu(),
            Backend::Cpu => true,
            Backend::Reference => false,
        }
    }
}

/// What the ops of one pass need to know about it.
#[derive(Clone, Copy)]
pub struct PassInfo<'a> {
    /// `Some` in training: LoRA dropout draws from its generator.
    pub train: Option<&'a TrainCtx>,
    /// Build the backward graph.
    pub grad: bool,
}

/// A projection's LoRA pair as one pass reads it: `scaling · dropout(x) Aᵀ Bᵀ`, `A` (r, in),
/// `B` (out, r).
pub struct LoraSite {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
}

/// Chosen rows of a (B, T, ·) activation, held as (N, 1, ·): one position per batch row
/// ([`Rows::new`]: [`crate::Decoder::forward_at`]'s last block, row `r`'s position
/// `flat[r] - r·seq`), or every real position of a padded batch ([`Rows::real`]: the blocks
/// then multiply no padding).
pub struct Rows {
    pub seq: usize,
    /// B: the batch rows of the whole activation.
    pub batch: usize,
    /// `b·seq + position`: the rows' indices in the (B·T, ·) activation, ascending.
    pub flat: Vec<usize>,
}

impl Rows {
    pub fn new(seq: usize, positions: &[usize]) -> Self {
        Self {
            seq,
            batch: positions.len(),
            flat: positions
                .iter()
                .enumerate()
                .map(|(r, &p)| r * seq + p)
                .collect(),
        }
    }

    /// Every real position of `mask`'s batch.
    pub fn real(mask: &Mask) -> Self {
        Self {
            seq: mask.seq,
            batch: mask.batch,
            flat: (0..mask.data.len())
                .filter(|&i| mask.data[i] == 1)
                .collect(),
        }
    }

    /// B·T: the rows of the whole activation.
    pub fn all(&self) -> usize {
        self.batch * self.seq
    }

    /// Each row's position (rows made by [`Rows::new`]: one per batch row).
    pub fn positions(&self) -> Vec<usize> {
        self.flat
            .iter()
            .enumerate()
            .map(|(r, &f)| f - r * self.seq)
            .collect()
    }

    pub fn index(&self, dev: &Device) -> Result<Tensor> {
        let idx: Vec<u32> = self.flat.iter().map(|&i| i as u32).collect();
        Tensor::from_vec(idx, self.flat.len(), dev)
    }

    /// The chosen rows of `x` (B, T, …) as (N, 1, …).
    pub fn pick(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let mut flat = vec![self.all()];
        flat.extend_from_slice(&dims[2..]);
        let mut out = vec![self.flat.len(), 1];
        out.extend_from_slice(&dims[2..]);
        x.reshape(flat)?
            .index_select(&self.index(x.device())?, 0)?
            .reshape(out)
    }

    /// The inverse of [`Rows::pick`]: `x` (N, 1, …) at its rows of a (B, T, …) activation,
    /// zeros elsewhere.
    pub fn place(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let mut flat = vec![self.all()];
        flat.extend_from_slice(&dims[2..]);
        let mut rows = vec![self.flat.len()];
        rows.extend_from_slice(&dims[2..]);
        let mut out = vec![self.batch, self.seq];
        out.extend_from_slice(&dims[2..]);
        Tensor::zeros(flat, x.dtype(), x.device())?
            .index_add(&self.index(x.device())?, &x.reshape(rows)?, 0)?
            .reshape(out)
    }
}

/// RMSNorm of `x` (…, hidden) scaled by `w`: normalised in f32, scaled in the compute dtype.
pub fn rms_norm(backend: Backend, x: &Tensor, w: &Tensor, eps: f64, grad: bool) -> Result<Tensor> {
    if backend.kernels(x.device()) {
        cpu::rms_norm(x, w, eps)
    } else if !grad && x.dtype() == DType::F32 {
        // candle's kernel records no backward pass: only where none is needed.
        candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
    } else {
        reference::rms_norm(x, w, eps)
    }
}

/// RoPE of `x` (B, T, heads, hd) at the pass's positions.
pub fn rope(backend: Backend, x: &Tensor, pos: &Positions) -> Result<Tensor> {
    if backend.kernels(x.device()) {
        cpu::rope(x, pos.tables())
    } else {
        let (cos, sin) = pos.cos_sin()?;
        reference::rope(&x.contiguous()?, cos, sin)
    }
}

/// `silu(gate) · up`.
pub fn swiglu(backend: Backend, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if backend.kernels(gate.device()) {
        cpu::swiglu(gate, up)
    } else {
        reference::swiglu(gate, up)
    }
}

/// Causal attention with RoPE over a (B, T) batch: `q` (B, T, heads·hd), `k`, `v` (B, T,
/// kv_heads·hd) as the projections give them → (B, T, heads·hd). With `keep`, also this
/// layer's keys after RoPE and its values, (B, T, kv_heads, hd) each, for a prefix cache. On
/// the CPU a bf16 `kernel` (the decoder's) multiplies the forward pass's products.
pub fn attention(
    backend: Backend,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    pos: &Positions,
    keep: Option<&mut Vec<(Tensor, Tensor)>>,
    kernel: Kernel,
) -> Result<Tensor> {
    let (b, t, width) = q.dims3()?;
    let hd = width / heads.max(1);
    let four = |x: &Tensor, n: usize| x.reshape((b, t, n, hd));
    if backend.kernels(q.device()) {
        // Heads side by side, RoPE inside the kernel: no reshape or transpose nodes.
        if let Some(keep) = keep {
            keep.push((
                cpu::rope(&four(k, kv_heads)?, pos.tables())?,
                four(v, kv_heads)?,
            ));
        }
        return cpu::attention_flat(
            q,
            k,
            v,
            (heads, kv_heads),
            pos.mask(),
            Some(pos.tables()),
            kernel,
        );
    }
    let v = four(v, kv_heads)?;
    let q = rope(backend, &four(q, heads)?, pos)?;
    let k = rope(backend, &four(k, kv_heads)?, pos)?;
    if let Some(keep) = keep {
        keep.push((k.clone(), v.clone()));
    }
    reference::attention(&q, &k, &v, pos.bias()?)?.reshape((b, t, heads * hd))
}

/// Attention of suffix rows over cached prefixes and their own tokens: `q` (B, Ts, heads, hd),
/// `k`, `v` (B, Ts, kv_heads, hd) before RoPE (`pos` continues each row's prefix), the rows in
/// consecutive runs `prefixes[i] = (keys (kv_heads, hd, Tp), values (kv_heads, Tp, hd), n)`.
/// → (B, Ts, heads, hd).
pub fn prefix_attention(
    backend: Backend,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    pos: &Positions,
    prefixes: &[(&Tensor, &Tensor, usize)],
) -> Result<Tensor> {
    let (q, k) = (rope(backend, q, pos)?, rope(backend, k, pos)?);
    if backend.kernels(q.device()) {
        // One op over every run of rows: no narrow/cat nodes (each would cost a full-size
        // gradient copy in a training pass).
        cpu::prefix_attention(&q, &k, v, pos.mask(), prefixes)
    } else {
        reference::prefix_attention_runs(&q, &k, v, pos.bias()?, prefixes)
    }
}

/// Attention of one query per row, `q` (B, 1, heads, hd) at `rows`, over `k`, `v` (B, T,
/// kv_heads, hd) at every position, before RoPE → (B, 1, heads·hd): each row reads its real keys
/// up to its position.
pub fn attention_at(
    backend: Backend,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    pos: &Positions,
    rows: &Rows,
) -> Result<Tensor> {
    let (q, k) = if backend.kernels(q.device()) {
        (
            cpu::rope(q, &pos.tables_at(&rows.flat))?,
            cpu::rope(k, pos.tables())?,
        )
    } else {
        let (cos, sin) = pos.cos_sin()?;
        (
            reference::rope(q, &rows.pick(cos)?, &rows.pick(sin)?)?,
            reference::rope(&k.contiguous()?, cos, sin)?,
        )
    };
    // B·heads·T scores: small enough for plain candle ops and their backward on any path.
    reference::attention_rows(&q, &k, v, &pos.bias_at(&rows.positions())?)
}

/// The frozen projection `x Wᵀ (+ b)` of `x` (B, T, in), adapted by `lora` (with its dropout
/// in training); the weight never receives a gradient. With `rows`, `x` (B, 1, in) holds only
/// those rows of a (B, T, in) input, and dropout keeps those rows' draws of a whole pass. On
/// the CPU, a weight packed for a bf16 kernel is multiplied with it ([`Weight`]).
pub fn linear(
    backend: Backend,
    x: &Tensor,
    (w, b): (&Weight, Option<&Tensor>),
    lora: Option<&LoraSite>,
    pass: PassInfo,
    rows: Option<&Rows>,
) -> Result<Tensor> {
    if !backend.kernels(x.device()) {
        return reference::linear(x, &w.tensor()?, b, lora, pass, rows);
    }
    // One op: the projection, its LoRA path and that path's dropout, on (B, T, in) as it
    // comes (no reshape nodes: each costs a full-size gradient copy backwards).
    let Some(l) = lora else {
        return cpu::linear_weight(x, w, b, None);
    };
    // The draws of [`reference::dropout`] (so runs and checkpoints replay the same masks on
    // either path); none outside training.
    let draw = |n: usize| -> Result<Option<cpu::DropMask>> {
        match pass.train {
            Some(train) if l.dropout > 0.0 => Ok(Some(cpu::dropout_mask(
                n,
                l.dropout,
                &mut train.rng.borrow_mut(),
            )?)),
            _ => Ok(None),
        }
    };
    let dropout = match rows {
        None => draw(x.elem_count())?,
        Some(r) => {
            let width = x.dim(candle_core::D::Minus1)?;
            draw(r.all() * width)?.map(|m| m.rows(&r.flat, width))
        }
    };
    cpu::linear_weight(
        x,
        w,
        b,
        Some(cpu::LoraPath {
            a: &l.a,
            b: &l.b,
            scaling: l.scaling,
            dropout,
        }),
    )
}

/// The MLP without LoRA or biases: `down(silu(gate(x)) · up(x))`, on the CPU as one op that
/// keeps only gate and up for its backward.
pub fn mlp(
    backend: Backend,
    x: &Tensor,
    (gate, up, down): (&Weight, &Weight, &Weight),
    pass: PassInfo,
) -> Result<Tensor> {
    if backend.kernels(x.device()) {
        return cpu::mlp_weights(x, gate, up, down);
    }
    let g = reference::linear(x, &gate.tensor()?, None, None, pass, None)?;
    let u = reference::linear(x, &up.tensor()?, None, None, pass, None)?;
    reference::linear(
        &reference::swiglu(&g, &u)?,
        &down.tensor()?,
        None,
        None,
        pass,
        None,
    )
}
