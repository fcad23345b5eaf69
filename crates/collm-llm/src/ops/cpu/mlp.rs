//! SwiGLU, and the MLP (gate, up, SwiGLU, down) as one op.

use super::*;
use crate::ops::Weight;
use std::mem::MaybeUninit;

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

avx512_dispatch! {
    /// `a = silu(g) · u` element-wise (the shortest length).
    fn silu_mul(g: &[f32], u: &[f32], a: &mut [f32]) {
        for ((a, g), u) in a.iter_mut().zip(g).zip(u) {
            *a = g * sigmoid(*g) * u;
        }
    }
}

avx512_dispatch! {
    /// The gradients of `silu(g) · u` along one row for its gradient `da`, from gate and up
    /// kept in bf16, into `dg` and `du` in bf16 (the shortest length); with `bf`, `da` and both
    /// gradients rounded to bf16 first, as separate bf16 ops would store them. `dg` and `du`
    /// may start uninitialised: every value is written.
    fn swiglu_grad_row(
        da: &[f32],
        g: &[u16],
        u: &[u16],
        dg: &mut [MaybeUninit<u16>],
        du: &mut [MaybeUninit<u16>],
        bf: bool,
    ) {
        const W: usize = 64;
        let (mut gf, mut uf, mut a, mut b) = ([0f32; W], [0f32; W], [0f32; W], [0f32; W]);
        let n = da.len().min(g.len()).min(u.len()).min(dg.len()).min(du.len());
        for c0 in (0..n).step_by(W) {
            let w = (n - c0).min(W);
            let kept = g[c0..c0 + w].iter().zip(&u[c0..c0 + w]);
            for ((gf, uf), (g, u)) in gf.iter_mut().zip(uf.iter_mut()).zip(kept) {
                (*gf, *uf) = (bf16::from_bf16(*g), bf16::from_bf16(*u));
            }
            let each = a.iter_mut().zip(b.iter_mut());
            let each = each.zip(da[c0..c0 + w].iter().zip(&gf).zip(&uf));
            // The dtype test outside the loops: they vectorize.
            if bf {
                for ((a, b), ((da, g), u)) in each {
                    let (x, y) = swiglu_grad(round(*da, DType::BF16), *g, *u);
                    (*a, *b) = (round(x, DType::BF16), round(y, DType::BF16));
                }
            } else {
                for ((a, b), ((da, g), u)) in each {
                    (*a, *b) = swiglu_grad(*da, *g, *u);
                }
            }
            // SAFETY: dg and du hold at least n ≥ c0 + w values.
            unsafe {
                bf16::convert_to(&a[..w], dg[c0..].as_mut_ptr().cast());
                bf16::convert_to(&b[..w], du[c0..].as_mut_ptr().cast());
            }
        }
    }
}

/// The gradients of `silu(g) · u` for its gradient `d`: (for g, for u).
#[inline(always)]
fn swiglu_grad(d: f32, g: f32, u: f32) -> (f32, f32) {
    let s = sigmoid(g);
    (d * u * s * (1.0 + g * (1.0 - s)), d * g * s)
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
            let grads = |(d, g, u): (&f32, &f32, &f32)| swiglu_grad(*d, *g, *u);
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

/// An MLP's gate and up projections from its forward pass, kept for the backward pass: in
/// f32 on the f32 path; in bf16 where the products run on a bf16 kernel (half the bytes written
/// in the forward pass and read in the backward one; their products already read bf16
/// inputs, and the gradients through SwiGLU are rounded to bf16 for the next products).
enum GateUp {
    F32(Vec<f32>, Vec<f32>),
    Bf16(Vec<u16>, Vec<u16>),
}

struct Mlp {
    /// (inter, hidden), (inter, hidden) and (hidden, inter), in the compute dtype or packed for
    /// a bf16 kernel; frozen.
    gate: Weight,
    up: Weight,
    down: Weight,
    /// Keep gate and up for the backward pass (a graph is being built).
    keep: bool,
    saved: std::sync::Mutex<Option<Arc<GateUp>>>,
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

    /// The kernel and packings when all three projections have a bf16 kernel.
    fn all_bf16(&self) -> Option<(bf16::Kernel, [&bf16::Bf16Weight; 3])> {
        let ((kernel, wg), (_, wu), (_, wd)) =
            (self.gate.bf16()?, self.up.bf16()?, self.down.bf16()?);
        Some((kernel, [wg, wu, wd]))
    }

    /// The forward pass with bf16 kernels: the activation `silu(x Wgᵀ) ⊙ (x Wuᵀ)` (n×inter)
    /// made block by block where the two products come out of the kernel and stored in bf16
    /// as the down projection reads it, so that neither product is written to memory unless
    /// `keep` (a backward pass needs them: then also gate and up, in bf16); then `· Wdᵀ`.
    /// `None` unless all three weights are packed for a bf16 kernel.
    #[allow(clippy::type_complexity)]
    fn forward_bf16(
        &self,
        x: &[f32],
        n: usize,
        keep: bool,
    ) -> Option<(Vec<f32>, Option<(Vec<u16>, Vec<u16>)>)> {
        let (kernel, [wg, wu, wd]) = self.all_bf16()?;
        let inter = self.gate.dims2().0;
        let len = n * inter;
        let mut kept: Option<(Vec<u16>, Vec<u16>)> =
            keep.then(|| (Vec::with_capacity(len), Vec::with_capacity(len)));
        let (go, uo) = match &mut kept {
            Some((g, u)) => (
                Some(bf16::Out(g.as_mut_ptr())),
                Some(bf16::Out(u.as_mut_ptr())),
            ),
            None => (None, None),
        };
        let fill = |act: bf16::Out<u16>, lda: usize| {
            let each =
                |r0: usize, c0: usize, rows: usize, cols: usize, [gb, ub]: [&[f32; 1024]; 2]| {
                    // SwiGLU over the whole block (fixed length: no remainder loops; the
                    // values past `rows` × `cols` are dropped), then each output converted.
                    let mut a = [0f32; 1024];
                    silu_mul(gb, ub, &mut a);
                    let at = r0 * inter + c0;
                    // SAFETY: rows r0..r0 + rows < n and columns c0..c0 + cols < inter of each
                    // buffer (capacity n·inter; the activation's rows `lda` apart); each block
                    // position is handed out once, so no two calls write the same elements.
                    unsafe {
                        bf16::convert_rows(&a, rows, cols, act.at(r0 * lda + c0), lda);
                        if let (Some(go), Some(uo)) = (go, uo) {
                            bf16::convert_rows(gb, rows, cols, go.at(at), inter);
                            bf16::convert_rows(ub, rows, cols, uo.at(at), inter);
                        }
                    }
                };
            let _span = times::span("frozen products (+ SwiGLU)");
            bf16::blocks_each(kernel, x, n, [wg.fwd(), wu.fwd()], &each);
        };
        // SAFETY: the epilogue writes every (row, column) of the n×inter activation (each
        // block position once, its valid rows and columns), and of gate and up when kept.
        let act = unsafe { bf16::Bf16Rows::build(n, inter, fill) };
        if let Some((g, u)) = &mut kept {
            // SAFETY: as above.
            unsafe {
                g.set_len(len);
                u.set_len(len);
            }
        }
        let _span = times::span("frozen products");
        Some((bf16::product_rows(kernel, &act, wd.fwd()), kept))
    }

    /// The backward pass with bf16 kernels: `da = d Wd`, through SwiGLU's gradient to
    /// `dgate` and `dup` stored in bf16 as the next products read them (half the bytes, and
    /// no conversion there), then `dx = dgate Wg + dup Wu`. The same values as the products
    /// one by one: each intermediate rounded to `dtype` as there, and the products round
    /// their inputs to bf16 alike. (SwiGLU's gradient as a pass over rows, not where `da`'s
    /// blocks come out of the kernel: that reads gate and up 32 values per row at a time, and
    /// measured slower.)
    fn backward_bf16(
        &self,
        d: &[f32],
        n: usize,
        (g, u): (&[u16], &[u16]),
        dtype: DType,
    ) -> Option<Vec<f32>> {
        let (kernel, [wg, wu, wd]) = self.all_bf16()?;
        let (inter, h) = self.gate.dims2();
        let da = {
            let _span = times::span("frozen products");
            bf16::backward(kernel, d, n, wd)
        };
        let bf = dtype == DType::BF16;
        let fill = |dgo: bf16::Out<u16>, duo: bf16::Out<u16>, lda: usize| {
            (0..n).into_par_iter().with_min_len(4).for_each(|i| {
                let at = i * inter;
                // SAFETY: row i < n of both buffers (rows `lda` apart, `inter` values each);
                // each row is written by one task.
                let (dg, du) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(dgo.at(i * lda).cast(), inter),
                        std::slice::from_raw_parts_mut(duo.at(i * lda).cast(), inter),
                    )
                };
                let row = at..at + inter;
                swiglu_grad_row(&da[row.clone()], &g[row.clone()], &u[row], dg, du, bf);
            });
        };
        let mut dup = None;
        // SAFETY: `fill` writes every (row, column) of both n×inter buffers.
        let dgate = unsafe {
            bf16::Bf16Rows::build(n, inter, |dgo, lda| {
                dup = Some(bf16::Bf16Rows::build(n, inter, |duo, _| {
                    fill(dgo, duo, lda)
                }));
            })
        };
        let dup = dup.expect("built with dgate");
        let _span = times::span("frozen products");
        let mut dx = bf16::product_rows(kernel, &dgate, wg.bwd());
        bf16::gemm_rows(kernel, &dup, wu.bwd(), &mut dx, h, true);
        Some(dx)
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
        let (y, kept) = match self.forward_bf16(&x, n, self.keep) {
            Some((y, kept)) => (y, kept.map(|(g, u)| GateUp::Bf16(g, u))),
            None => {
                let (g, u) = self.gate_up(&x, n, dtype)?;
                let act = swiglu_values(&g, &u, dtype);
                (Self::project(&self.down, &act, n)?, Some(GateUp::F32(g, u)))
            }
        };
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
        let h = self.gate.dims2().1;
        cpu_f32!(grad => d);
        let n = d.len() / h;
        let (g, u) = match &*saved {
            GateUp::F32(g, u) => (g, u),
            GateUp::Bf16(g, u) => {
                let dx = self.backward_bf16(&d, n, (g, u), dtype);
                let dx = dx.expect("kept in bf16 by a forward pass on bf16 kernels");
                return Ok(Some(tensor_from(dx, x)?));
            }
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::KernelChoice;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    /// The fused bf16 passes (SwiGLU and its gradient made where the products come out, the
    /// next product reading them in bf16) give the same values, bit for bit, as the same
    /// kernels' products one by one with SwiGLU in between (on gate and up rounded to bf16, as
    /// the fused pass keeps them): the epilogues round as the products' own conversion does.
    /// Ragged rows, columns and k.
    #[test]
    fn fused_bf16_passes_equal_the_products_one_by_one() {
        let (n, h, inter) = (70, 130, 600);
        let w = |rows: usize, cols: usize, seed: u64| {
            let v: Vec<f32> = random(rows * cols, seed).iter().map(|x| x * 0.2).collect();
            Tensor::from_vec(v, (rows, cols), &candle_core::Device::Cpu).unwrap()
        };
        let x = random(n * h, 1);
        let d = random(n * h, 2);
        let mut kernels = vec![bf16::Kernel::Emulated];
        for k in [bf16::Kernel::Avx512Bf16, bf16::Kernel::AmxBf16] {
            match k.available() {
                Ok(()) => kernels.push(k),
                Err(why) => eprintln!("skipped {}: {why}", k.name()),
            }
        }
        for kernel in kernels {
            let p = |t: &Tensor| Weight::new(t, KernelChoice::all(kernel)).unwrap();
            let mlp = Mlp {
                gate: p(&w(inter, h, 3)),
                up: p(&w(inter, h, 4)),
                down: p(&w(h, inter, 5)),
                keep: true,
                saved: std::sync::Mutex::new(None),
            };
            let (y, kept) = mlp.forward_bf16(&x, n, true).expect("all three in bf16");
            let (g, u) = kept.expect("kept");
            let (g1, u1) = mlp.gate_up(&x, n, DType::F32).unwrap();
            // Gate and up kept in bf16: the products' values rounded.
            let rounded = |v: &[f32]| v.iter().map(|&x| bf16::to_bf16(x)).collect::<Vec<u16>>();
            assert!(
                g == rounded(&g1) && u == rounded(&u1),
                "{}: gate and up",
                kernel.name()
            );
            let act = swiglu_values(&g1, &u1, DType::F32);
            let y1 = Mlp::project(&mlp.down, &act, n).unwrap();
            assert!(y == y1, "{}: forward", kernel.name());
            for dtype in [DType::F32, DType::BF16] {
                let dx = mlp.backward_bf16(&d, n, (&g, &u), dtype).unwrap();
                let mut da = Mlp::project_back_new(&mlp.down, &d, n).unwrap();
                da.iter_mut().for_each(|v| *v = round(*v, dtype));
                let widen = |v: &[u16]| v.iter().map(|&b| bf16::from_bf16(b)).collect::<Vec<f32>>();
                let (dg, du) = swiglu_grads(&da, &widen(&g), &widen(&u), dtype);
                let mut dx1 = Mlp::project_back_new(&mlp.gate, &dg, n).unwrap();
                Mlp::project_back(&mlp.up, &du, n, &mut dx1, true).unwrap();
                assert!(dx == dx1, "{} {dtype:?}: backward", kernel.name());
            }
        }
    }
}
