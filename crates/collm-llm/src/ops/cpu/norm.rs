//! RMSNorm: normalised in f32, scaled in the compute dtype (as transformers).

use super::*;

struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    /// `1 / sqrt(mean(x²) + eps)` of one row.
    #[inline]
    fn inverse_rms(&self, x: &[f32]) -> f32 {
        1.0 / (lane_dot(x, x) / x.len() as f32 + self.eps).sqrt()
    }
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
        let _span = times::span("rms_norm fwd");
        let dtype = xs.dtype();
        let x = as_f32(xs, xl)?;
        let w = as_f32(ws, wl)?;
        let h = w.len();
        if h == 0 || xl.shape().dims().last() != Some(&h) {
            bail!("rms-norm: weight of {h} for input {:?}", xl.shape());
        }
        // Written in full below: never zeroed first.
        let mut y = Vec::with_capacity(x.len());
        y.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(y, x)| {
                let r = self.inverse_rms(x);
                if dtype == DType::BF16 {
                    for ((y, x), w) in y.iter_mut().zip(x).zip(w.iter()) {
                        y.write(round(round(x * r, dtype) * w, dtype));
                    }
                } else {
                    for ((y, x), w) in y.iter_mut().zip(x).zip(w.iter()) {
                        y.write(x * r * w);
                    }
                }
            });
        // SAFETY: every element was written above (the rows cover all x.len()).
        unsafe { y.set_len(x.len()) };
        Ok((from_f32(y, dtype)?, xl.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _span = times::span("rms_norm bwd");
        cpu_f32!(x => xv);
        cpu_f32!(w => wv);
        cpu_f32!(grad => g);
        let h = wv.len();
        if g.len() != xv.len() || h == 0 || !xv.len().is_multiple_of(h) {
            bail!(
                "rms-norm: a gradient of {} for an input of {} (rows of {h})",
                g.len(),
                xv.len()
            );
        }
        // Written in full below: never zeroed first.
        let mut dx = Vec::with_capacity(xv.len());
        dx.spare_capacity_mut()[..xv.len()]
            .par_chunks_mut(h)
            .zip(xv.par_chunks(h).zip(g.par_chunks(h)))
            .for_each(|(dx, (x, g))| {
                let r = self.inverse_rms(x);
                // d/dx of x·r: r·(gw − x̂·mean(gw·x̂)), with gw = g·w and x̂ = x·r.
                let c = lane_dot3(g, &wv, x) * r / h as f32;
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(wv.iter()) {
                    dx.write(r * (g * w - x * r * c));
                }
            });
        // SAFETY: every element was written above (the rows cover all xv.len()).
        unsafe { dx.set_len(xv.len()) };
        let dw = if w.track_op() {
            let rows = xv.len() / h;
            let mut dw = vec![0f32; h];
            for k in 0..rows {
                let x = &xv[k * h..(k + 1) * h];
                let r = self.inverse_rms(x);
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
