//! SwiGLU, and the MLP (gate, up, SwiGLU, down) as one op.

use super::*;

struct SwiGlu;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `silu(g) · u` element-wise, rounded to `dtype` as the separate ops store it (silu, then
/// the product). The dtype test sits outside the loops, so that they vectorize.
fn swiglu_values(g: &[f32], u: &[f32], dtype: DType) -> Vec<f32> {
    let mut y = vec![0f32; g.len()];
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
