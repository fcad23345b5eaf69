//! The same operations composed of plain candle ops with candle's own backward passes: the
//! reference the CPU kernels are tested against, and the path on devices without them.

use super::{cpu, LoraSite, Mask, PassInfo, Rows};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, D,
};
use rand::Rng;

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
pub fn attention_bias(mask: &Mask, dtype: DType, dev: &candle_core::Device) -> Result<Tensor> {
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

/// Additive bias (B, 1, 1, T) for one query per row at `positions[b]`: the row's real keys up
/// to its position (the last block of [`crate::Decoder::forward_at`]).
pub fn attention_bias_at(
    mask: &Mask,
    positions: &[usize],
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let (b, t) = (mask.batch, mask.seq);
    let bias: Vec<f32> = (0..b * t)
        .map(|i| {
            if mask.data[i] == 1 && i % t <= positions[i / t] {
                0.0
            } else {
                -1e9
            }
        })
        .collect();
    Tensor::from_vec(bias, (b, 1, 1, t), dev)?.to_dtype(dtype)
}

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

/// `q` (B, T, heads, hd), `k`, `v` (B, T, kv_heads, hd) → (B, T, heads, hd).
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

/// [`prefix_attention`] over consecutive runs of suffix rows, each run over its own prefix:
/// `prefixes[i] = (pk, pv, n)` for the next `n` rows; `bias` (B, 1, Ts, Ts) for all rows.
pub fn prefix_attention_runs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    prefixes: &[(&Tensor, &Tensor, usize)],
) -> Result<Tensor> {
    let mut outs = Vec::with_capacity(prefixes.len());
    let mut row = 0;
    for &(pk, pv, n) in prefixes {
        let part = |x: &Tensor| x.narrow(0, row, n);
        outs.push(prefix_attention(
            &part(q)?,
            &part(k)?,
            &part(v)?,
            &part(bias)?,
            pk,
            pv,
        )?);
        row += n;
    }
    Tensor::cat(&outs, 0)
}

/// The training path's frozen projection: the forward pass hands through `y`, already computed
/// from a detached input; the backward pass gives the input `x` its gradient `grad · W` and the
/// weight none. Candle's matmul backward always computes both operands' gradients, which for a
/// frozen weight is a third of a training step's matmul FLOPs spent on a result nobody reads.
struct FrozenWeight {
    w: Tensor,
}

impl FrozenWeight {
    fn check(l: &Layout) -> Result<()> {
        // try_clone copies the whole buffer, so `y` must be exactly its buffer (it is: it is
        // a fresh matmul result).
        if !l.is_contiguous() || l.start_offset() != 0 {
            candle_core::bail!("frozen-weight: the projection output must be contiguous");
        }
        Ok(())
    }
}

impl CustomOp2 for FrozenWeight {
    fn name(&self) -> &'static str {
        "frozen-weight"
    }
    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::check(yl)?;
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }
    fn cuda_fwd(
        &self,
        _x: &CudaStorage,
        _xl: &Layout,
        y: &CudaStorage,
        yl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::check(yl)?;
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&self.w)?), None))
    }
}

/// Inverted dropout of a training pass. On the CPU: the same draws from the step's generator
/// as the composed `collm_nn::layers::dropout` (so resumed and older runs see the same masks),
/// drawn in parallel and kept as bits ([`cpu::dropout`]). On other devices: a mask drawn there
/// (no host draws, no upload) from the device generator seeded from the step's generator.
/// Outside training, or with `p = 0`, `x` itself.
pub fn dropout(x: &Tensor, p: f64, pass: PassInfo) -> Result<Tensor> {
    let Some(train) = pass.train else {
        return Ok(x.clone());
    };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let dev = x.device();
    let mut rng = train.rng.borrow_mut();
    match dev {
        Device::Cpu => cpu::dropout(x, p, &mut rng),
        _ => {
            dev.set_seed(rng.gen())?;
            let keep = Tensor::rand(0f32, 1f32, x.shape(), dev)?
                .ge(p)?
                .to_dtype(x.dtype())?;
            (x * keep)?.affine(1.0 / (1.0 - p), 0.0)
        }
    }
}

/// The projection `x Wᵀ (+ b)` of `x` (B, T, in) with its LoRA path `scaling · dropout(x) Aᵀ
/// Bᵀ` in candle ops, the frozen weight receiving no gradient ([`FrozenWeight`]). With `rows`,
/// `x` (B, 1, in) holds only those rows of a (B, T, in) input, and dropout draws for all B·T
/// positions and keeps those rows' draws (the masks a whole pass would apply there).
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    lora: Option<&LoraSite>,
    pass: PassInfo,
    rows: Option<&Rows>,
) -> Result<Tensor> {
    let (bsz, t, fan_in) = x.dims3()?;
    let flat = x.reshape((bsz * t, fan_in))?;
    // LoRA: scaling · dropout(x) Aᵀ Bᵀ, scaled while it is r wide.
    let low = match lora {
        Some(l) => {
            let p = l.dropout;
            let xin = match rows {
                Some(r) if pass.train.is_some() && p > 0.0 => {
                    // The whole pass's mask, drawn over ones, at the chosen rows.
                    let ones = Tensor::ones((r.all(), fan_in), flat.dtype(), flat.device())?;
                    (&flat * dropout(&ones, p, pass)?.index_select(&r.index(x.device())?, 0)?)?
                }
                _ => dropout(&flat, p, pass)?,
            };
            let low = (xin.to_dtype(l.a.dtype())?.matmul(&l.a.t()?)? * l.scaling)?;
            Some((low, &l.b))
        }
        None => None,
    };
    let input_has_grad = pass.grad && flat.track_op();
    let mut y = if input_has_grad {
        flat.detach().matmul(&w.t()?)?
    } else {
        flat.matmul(&w.t()?)?
    };
    if let Some(bias) = b {
        y = y.broadcast_add(bias)?;
    }
    if input_has_grad {
        y = flat.apply_op2(&y, FrozenWeight { w: w.clone() })?;
    }
    let y = match low {
        Some((low, bm)) => (y + low.matmul(&bm.t()?)?.to_dtype(x.dtype())?)?,
        None => y,
    };
    y.reshape((bsz, t, ()))
}
