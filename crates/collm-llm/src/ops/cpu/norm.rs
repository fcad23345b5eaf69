//! RMSNorm: normalised in f32, scaled in the compute dtype (as transformers).

use super::*;

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
