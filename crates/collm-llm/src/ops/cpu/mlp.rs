//! SwiGLU, and the MLP (gate, up, SwiGLU, down) as one op.

use super::*;
use crate::ops::Weight;

struct SwiGlu;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `silu(g) · u` element-wise, rounded to `dtype` as the separate ops store it (silu, then
/// the product). The dtype test sits outside the loops, so that they vectorize.
fn swiglu_values(g: &[f32], u: &[f32], dtype: DType) -> Vec<f32> {
    // Written in full below: never zeroed first (at these sizes that costs as much as the loop).
    let mut y = Vec::with_capacity(g.len());
    y.spare_capacity_mut()[..g.len()]
        .par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(y, (g, u))| {
            if dtype == DType::BF16 {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    y.write(round(round(g * sigmoid(*g), dtype) * u, dtype));
                }
            } else {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    y.write(g * sigmoid(*g) * u);
                }
            }
        });
    // SAFETY: every element was written above (the chunks cover all g.len()).
    unsafe { y.set_len(g.len()) };
    y
}

/// The gradients of `silu(g) · u` for the output gradient `d`: (for g, for u), rounded to
/// `dtype`.
fn swiglu_grads(d: &[f32], g: &[f32], u: &[f32], dtype: DType) -> (Vec<f32>, Vec<f32>) {
    let n = g.len();
    // Every element is written below only if the three have one length (set_len relies on it).
    assert!(
        d.len() == n && u.len() == n,
        "swiglu: gradient, gate and up of different sizes"
    );
    // Written in full below: never zeroed first.
    let (mut dg, mut du) = (Vec::with_capacity(n), Vec::with_capacity(n));
    dg.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .zip(du.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
        .zip(
            d.par_chunks(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(u.par_chunks(CHUNK)),
        )
        .for_each(|((dg, du), ((d, g), u))| {
            let grads = |(d, g, u): (&f32, &f32, &f32)| {
                let s = sigmoid(*g);
                (d * u * s * (1.0 + g * (1.0 - s)), d * g * s)
            };
            // Zipped, with the dtype test outside the loops: they vectorize.
            let each = dg.iter_mut().zip(du.iter_mut()).zip(d.iter().zip(g).zip(u));
            if dtype == DType::BF16 {
                for ((dg, du), ((d, g), u)) in each {
                    let (a, b) = grads((d, g, u));
                    dg.write(round(a, dtype));
                    du.write(round(b, dtype));
                }
            } else {
                for ((dg, du), ((d, g), u)) in each {
                    let (a, b) = grads((d, g, u));
                    dg.write(a);
                    du.write(b);
                }
            }
        });
    // SAFETY: every element of both was written above (the chunks cover all n).
    unsafe {
        dg.set_len(n);
        du.set_len(n);
    }
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
        let _span = times::span("swiglu fwd");
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
        let _span = times::span("swiglu bwd");
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
    /// (inter, hidden), (inter, hidden) and (hidden, inter), in the compute dtype or packed for
    /// a bf16 kernel; frozen.
    gate: Weight,
    up: Weight,
    down: Weight,
    /// Keep gate and up for the backward pass (a graph is being built).
    keep: bool,
    saved: std::sync::Mutex<Option<GateUp>>,
}

impl Mlp {
    /// `x Wgᵀ` and `x Wuᵀ` for `x` (n×hidden), rounded to `dtype` as separate projections
    /// would store them (with bf16 kernels: `x` packed once for both).
    fn gate_up(&self, x: &[f32], n: usize, dtype: DType) -> Result<(Vec<f32>, Vec<f32>)> {
        let _span = times::span("frozen products");
        let (inter, h) = self.gate.dims2();
        let (mut g, mut u) = match (self.gate.bf16(), self.up.bf16()) {
            (Some((kernel, wg)), Some((_, wu))) => {
                // One pass over x's rows for both products.
                let mut gu = bf16::products(kernel, x, n, &[wg.fwd(), wu.fwd()]);
                let u = gu.pop().expect("two products");
                (gu.pop().expect("two products"), u)
            }
            _ => {
                cpu_f32!(self.gate.tensor()? => wg);
                cpu_f32!(self.up.tensor()? => wu);
                let proj = |w: &[f32]| {
                    matmul_new((n, inter, h), (x, (h, 1)), (w, (1, h)), pool_parallelism())
                };
                (proj(&wg), proj(&wu))
            }
        };
        if dtype == DType::BF16 {
            g.par_iter_mut().for_each(|v| *v = round(*v, dtype));
            u.par_iter_mut().for_each(|v| *v = round(*v, dtype));
        }
        Ok((g, u))
    }

    /// With bf16 kernels for gate and up: the activation `silu(x Wgᵀ) ⊙ (x Wuᵀ)` (n×inter)
    /// made block by block where the two products come out of the kernel, so neither is
    /// written to memory unless `keep` (a backward pass needs them: then also gate and up).
    /// `None` for f32 weights.
    #[allow(clippy::type_complexity)]
    fn act_bf16(
        &self,
        x: &[f32],
        n: usize,
        keep: bool,
    ) -> Option<(Vec<f32>, Option<(Vec<f32>, Vec<f32>)>)> {
        let ((kernel, wg), (_, wu)) = (self.gate.bf16()?, self.up.bf16()?);
        let inter = self.gate.dims2().0;
        let len = n * inter;
        let mut act: Vec<f32> = Vec::with_capacity(len);
        let mut kept: Option<(Vec<f32>, Vec<f32>)> =
            keep.then(|| (Vec::with_capacity(len), Vec::with_capacity(len)));
        let out = bf16::Out(act.as_mut_ptr());
        let (go, uo) = match &mut kept {
            Some((g, u)) => (
                Some(bf16::Out(g.as_mut_ptr())),
                Some(bf16::Out(u.as_mut_ptr())),
            ),
            None => (None, None),
        };
        let each =
            |r0: usize, c0: usize, rows: usize, cols: usize, gb: &[f32; 1024], ub: &[f32; 1024]| {
                for r in 0..rows {
                    let (g, u) = (&gb[r * 32..r * 32 + cols], &ub[r * 32..r * 32 + cols]);
                    let at = (r0 + r) * inter + c0;
                    // SAFETY: row r0 + r < n and columns c0..c0 + cols < inter of each buffer
                    // (capacity n·inter); each block position is handed out once, so no two
                    // calls write the same elements.
                    unsafe {
                        let a = std::slice::from_raw_parts_mut(out.at(at), cols);
                        for ((a, g), u) in a.iter_mut().zip(g).zip(u) {
                            *a = g * sigmoid(*g) * u;
                        }
                        if let (Some(go), Some(uo)) = (go, uo) {
                            std::ptr::copy_nonoverlapping(g.as_ptr(), go.at(at), cols);
                            std::ptr::copy_nonoverlapping(u.as_ptr(), uo.at(at), cols);
                        }
                    }
                }
            };
        let span = times::span("frozen products (+ SwiGLU)");
        bf16::paired_blocks(kernel, x, n, (wg.fwd(), wu.fwd()), &each);
        drop(span);
        // SAFETY: every (row, column) of the n×inter buffers was written above (each block
        // position once, its valid rows and columns).
        unsafe {
            act.set_len(len);
            if let Some((g, u)) = &mut kept {
                g.set_len(len);
                u.set_len(len);
            }
        }
        Some((act, kept))
    }

    /// `a (n×k) · Wᵀ` for the projection `w` (out×k): its bf16 kernel, or f32.
    fn project(w: &Weight, a: &[f32], n: usize) -> Result<Vec<f32>> {
        let _span = times::span("frozen products");
        let (out, k) = w.dims2();
        if let Some((kernel, bw)) = w.bf16() {
            return Ok(bf16::forward(kernel, a, n, bw));
        }
        cpu_f32!(w.tensor()? => wv);
        Ok(matmul_new(
            (n, out, k),
            (a, (k, 1)),
            (&wv, (1, k)),
            pool_parallelism(),
        ))
    }

    /// `g (n×out) · W` for the projection `w` (out×in) in a new buffer: its bf16 kernel, or f32.
    fn project_back_new(w: &Weight, g: &[f32], n: usize) -> Result<Vec<f32>> {
        let _span = times::span("frozen products");
        let (out, inp) = w.dims2();
        if let Some((kernel, bw)) = w.bf16() {
            return Ok(bf16::backward(kernel, g, n, bw));
        }
        cpu_f32!(w.tensor()? => wv);
        Ok(matmul_new(
            (n, inp, out),
            (g, (out, 1)),
            (&wv, (inp, 1)),
            pool_parallelism(),
        ))
    }

    /// `dst (n×in) [+]= g (n×out) · W` for the projection `w` (out×in): its bf16 kernel, or f32.
    fn project_back(
        w: &Weight,
        g: &[f32],
        n: usize,
        dst: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        let _span = times::span("frozen products");
        let (out, inp) = w.dims2();
        if let Some((kernel, bw)) = w.bf16() {
            bf16::backward_into(kernel, g, n, bw, dst, accumulate);
            return Ok(());
        }
        cpu_f32!(w.tensor()? => wv);
        matmul(
            n,
            inp,
            out,
            dst,
            inp,
            accumulate,
            g,
            (out, 1),
            &wv,
            (inp, 1),
            pool_parallelism(),
        );
        Ok(())
    }
}

impl CustomOp1 for Mlp {
    fn name(&self) -> &'static str {
        "fused-mlp"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _span = times::span("mlp fwd");
        let dtype = s.dtype();
        let x = as_f32(s, l)?;
        let (inter, h) = self.gate.dims2();
        if l.shape().dims().last() != Some(&h)
            || self.up.dims2() != (inter, h)
            || self.down.dims2() != (h, inter)
        {
            bail!(
                "mlp: input {:?} for gate {:?}, up {:?}, down {:?}",
                l.shape(),
                self.gate.dims2(),
                self.up.dims2(),
                self.down.dims2()
            );
        }
        let n = x.len() / h;
        let (act, kept) = match self.act_bf16(&x, n, self.keep) {
            Some(r) => r,
            None => {
                let (g, u) = self.gate_up(&x, n, dtype)?;
                (swiglu_values(&g, &u, dtype), Some((g, u)))
            }
        };
        let y = Self::project(&self.down, &act, n)?;
        if self.keep {
            let kept = kept.expect("gate and up kept for the backward pass");
            *self.saved.lock().expect("mlp state") = Some(Arc::new(kept));
        }
        Ok((from_f32(y, dtype)?, l.shape().clone()))
    }

    /// `da = g Wd`, through SwiGLU to `dgate` and `dup`, then `dx = dgate Wg + dup Wu`; each
    /// intermediate rounded to the compute dtype as the separate ops' outputs would be.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _span = times::span("mlp bwd");
        let dtype = x.dtype();
        let saved = self.saved.lock().expect("mlp state").clone();
        let Some(saved) = saved else {
            bail!("mlp: the forward pass kept nothing for a backward pass");
        };
        let (g, u) = (&saved.0, &saved.1);
        let h = self.gate.dims2().1;
        cpu_f32!(grad => d);
        let n = d.len() / h;
        // da (n×inter) = d (n×hidden) · Wd (hidden×inter)
        let mut da = Self::project_back_new(&self.down, &d, n)?;
        if dtype == DType::BF16 {
            // As the separate down projection would hand it on: in bf16.
            da.par_iter_mut().for_each(|v| *v = round(*v, dtype));
        }
        let (dg, du) = swiglu_grads(&da, g, u, dtype);
        // dx (n×hidden) = dgate · Wg + dup · Wu, W (inter×hidden)
        let mut dx = Self::project_back_new(&self.gate, &dg, n)?;
        Self::project_back(&self.up, &du, n, &mut dx, true)?;
        Ok(Some(tensor_from(dx, x)?))
    }
}

/// A whole LLaMA MLP, `silu(x Wgᵀ) ⊙ (x Wuᵀ)` then `· Wdᵀ`, for frozen weights `gate`, `up`
/// (inter, hidden) and `down` (hidden, inter), as one op: `x` (…, hidden) → (…, hidden). Its
/// backward gives `x` its gradient and keeps only the gate and up activations (no separate
/// SwiGLU output, and none of the intermediate gradients that separate ops would pass
/// through candle's backward, each a full-size tensor there).
pub fn mlp(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor) -> Result<Tensor> {
    let w = |t: &Tensor| Weight::plain(&t.contiguous()?);
    mlp_weights(x, &w(gate)?, &w(up)?, &w(down)?)
}

/// [`mlp`] for [`Weight`]s: each multiplied with its bf16 kernel where it is packed for one.
pub fn mlp_weights(x: &Tensor, gate: &Weight, up: &Weight, down: &Weight) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = Mlp {
        gate: gate.clone(),
        up: up.clone(),
        down: down.clone(),
        keep: x.track_op(),
        saved: std::sync::Mutex::new(None),
    };
    x.apply_op1(op)
}
