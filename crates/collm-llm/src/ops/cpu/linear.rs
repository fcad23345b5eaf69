//! The frozen projection with its whole LoRA path inside.

use super::*;
use crate::ops::Weight;

struct FrozenLinear {
    /// (out, in), in the compute dtype or packed for a bf16 kernel; never receives a gradient.
    w: Weight,
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
        let (fan_out, fan_in) = self.w.dims2();
        let dims = xl.shape().dims();
        if dims.last() != Some(&fan_in) {
            bail!("linear: input {dims:?} for a weight of ({fan_out}, {fan_in})");
        }
        let n = xs.len() / fan_in;
        let projection = times::span("frozen products");
        let mut y = match self.w.bf16() {
            Some((kernel, bw)) => bf16::forward(kernel, &xs, n, bw),
            None => {
                cpu_f32!(self.w.tensor()? => w);
                // y (n×out) = x (n×in) · Wᵀ (in×out: element (i, o) at o·in + i)
                matmul_new(
                    (n, fan_out, fan_in),
                    (&xs, (fan_in, 1)),
                    (&w, (1, fan_in)),
                    pool_parallelism(),
                )
            }
        };
        drop(projection);
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

    /// `grad (…, out) · W` as f32 (n×in): with the weight's bf16 kernel where it has one, else
    /// in f32 like the forward pass.
    fn grad_x(&self, g: &[f32], x: &Tensor) -> Result<Vec<f32>> {
        let (fan_out, fan_in) = self.w.dims2();
        let n = g.len() / fan_out;
        if n * fan_in != x.elem_count() {
            bail!(
                "linear: a gradient of {} for input {:?}",
                g.len(),
                x.shape()
            );
        }
        let _span = times::span("frozen products");
        if let Some((kernel, bw)) = self.w.bf16() {
            return Ok(bf16::backward(kernel, g, n, bw));
        }
        cpu_f32!(self.w.tensor()? => w);
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
        let _span = times::span("linear fwd");
        self.run(s, l, None)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _span = times::span("linear bwd");
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
        let _span = times::span("linear+lora fwd");
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
        let _span = times::span("linear+lora bwd");
        let Some((scaling, mask)) = &self.lora else {
            bail!("linear: a LoRA op without its scaling");
        };
        let (fan_out, fan_in) = self.w.dims2();
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
    linear_weight(x, &Weight::plain(&w.contiguous()?)?, b, lora)
}

/// [`linear`] for a [`Weight`]: multiplied with its bf16 kernel where it is packed for one.
pub fn linear_weight(
    x: &Tensor,
    w: &Weight,
    b: Option<&Tensor>,
    lora: Option<LoraPath>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    match lora {
        Some(l) => {
            let (r, fan_in) = l.a.dims2()?;
            if l.b.dims2()?.1 != r || fan_in != w.dims2().1 {
                bail!(
                    "linear: LoRA A {:?} and B {:?} for a weight {:?}",
                    l.a.shape(),
                    l.b.shape(),
                    w.dims2()
                );
            }
            let op = FrozenLinear {
                w: w.clone(),
                b: b.cloned(),
                lora: Some((l.scaling as f32, l.dropout)),
            };
            x.apply_op3(&l.a.contiguous()?, &l.b.contiguous()?, op)
        }
        None => x.apply_op1(FrozenLinear {
            w: w.clone(),
            b: b.cloned(),
            lora: None,
        }),
    }
}
