//! Differentiable building blocks. candle's fused `layer_norm`, `softmax_last_dim` and friends
//! record no backward pass, so everything that trains is written with plain tensor ops here.

use crate::params::{Init, ParamStore};
use anyhow::Result;
use candle_core::{DType, Tensor, Var, D};
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;

/// Randomness for dropout during training; `None` in evaluation.
pub struct TrainCtx {
    pub rng: RefCell<ChaCha8Rng>,
}

impl TrainCtx {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: RefCell::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }
}

/// Inverted dropout with a seeded mask.
pub fn dropout(x: &Tensor, p: f64, ctx: Option<&TrainCtx>) -> Result<Tensor> {
    let Some(ctx) = ctx else {
        return Ok(x.clone());
    };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let n = x.elem_count();
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = {
        let mut rng = ctx.rng.borrow_mut();
        (0..n)
            .map(|_| {
                if rng.gen::<f64>() < p {
                    0.0
                } else {
                    scale as f32
                }
            })
            .collect()
    };
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// `y = x W^T + b` with PyTorch's default initialisation (Kaiming-uniform bound 1/sqrt(fan_in)).
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(ps: &mut ParamStore, name: &str, fan_in: usize, fan_out: usize) -> Result<Self> {
        let bound = 1.0 / (fan_in as f64).sqrt();
        Self::with_init(
            ps,
            name,
            fan_in,
            fan_out,
            Init::Uniform { bound },
            Init::Uniform { bound },
        )
    }

    /// A layer whose weight and bias start from the given initialisers (for models whose
    /// reference initialises them differently, e.g. the attention in SASRec: Xavier-uniform
    /// weight, zero bias).
    pub fn with_init(
        ps: &mut ParamStore,
        name: &str,
        fan_in: usize,
        fan_out: usize,
        weight: Init,
        bias: Init,
    ) -> Result<Self> {
        Ok(Self {
            weight: ps.param(&format!("{name}.weight"), &[fan_out, fan_in], weight)?,
            bias: Some(ps.param(&format!("{name}.bias"), &[fan_out], bias)?),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.t()?;
        let y = match x.rank() {
            2 => x.matmul(&w)?,
            _ => {
                let dims = x.dims().to_vec();
                let last = *dims.last().unwrap_or(&1);
                let flat = x.reshape(((), last))?.matmul(&w)?;
                let mut out = dims.clone();
                *out.last_mut().expect("rank > 0") = self.weight.dim(0)?;
                flat.reshape(out)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Layer normalisation over the last dimension, with learned scale and shift.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(ps: &mut ParamStore, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: ps.param(&format!("{name}.weight"), &[dim], Init::Ones)?,
            bias: ps.param(&format!("{name}.bias"), &[dim], Init::Zeros)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// Dice (DIN paper): `p(x)·x + (1 − p(x))·α·x` with `p = sigmoid(batch-normalised x)`. Batch
/// statistics in training, running statistics (momentum 0.1) in evaluation.
pub struct Dice {
    alpha: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
}

impl Dice {
    pub fn new(ps: &mut ParamStore, name: &str, dim: usize) -> Result<Self> {
        Ok(Self {
            alpha: ps.param(&format!("{name}.alpha"), &[dim], Init::Zeros)?,
            running_mean: ps.buffer(&format!("{name}.running_mean"), &[dim], Init::Zeros)?,
            running_var: ps.buffer(&format!("{name}.running_var"), &[dim], Init::Ones)?,
            eps: 1e-8,
        })
    }

    /// `x` is (N, dim) or (B, L, dim); statistics are over every dimension but the last.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dim = x.dim(D::Minus1)?;
        let flat = x.reshape(((), dim))?;
        let (mean, var) = if train && flat.dim(0)? > 1 {
            let mean = flat.mean_keepdim(0)?;
            let var = flat.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
            let m = 0.1;
            let rm =
                ((self.running_mean.as_tensor() * (1.0 - m))? + (mean.squeeze(0)?.detach() * m)?)?;
            let rv =
                ((self.running_var.as_tensor() * (1.0 - m))? + (var.squeeze(0)?.detach() * m)?)?;
            self.running_mean.set(&rm)?;
            self.running_var.set(&rv)?;
            (mean, var)
        } else {
            (
                self.running_mean.as_tensor().unsqueeze(0)?,
                self.running_var.as_tensor().unsqueeze(0)?,
            )
        };
        let norm = flat
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let p = candle_nn::ops::sigmoid(&norm)?;
        let one_minus_p = p.affine(-1.0, 1.0)?;
        let out = (p.mul(&flat)? + one_minus_p.mul(&flat)?.broadcast_mul(&self.alpha)?)?;
        Ok(out.reshape(x.shape())?)
    }
}

/// Mean binary cross-entropy on logits, written with differentiable ops and numerically
/// stable: `max(x, 0) − x·y + log(1 + exp(−|x|))`.
pub fn bce_with_logits(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let labels = labels.to_dtype(logits.dtype())?;
    let loss =
        ((logits.relu()? - logits.mul(&labels)?)? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(loss.mean_all()?)
}

/// Row-wise dot product of two (B, d) tensors → (B,).
pub fn rowwise_dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.mul(b)?.sum(D::Minus1)?)
}

/// A (B,) or (B, L) u32 index tensor from a slice.
pub fn index_tensor(ids: &[u32], shape: &[usize], dev: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(ids.to_vec(), shape, dev)?.to_dtype(DType::U32)?)
}
