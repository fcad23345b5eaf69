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

/// Rows per parallel task of the LoRA path's row loops.
const LORA_ROWS: usize = 32;

/// The LoRA path read row by row: `A` (r×in) and `Bᵀ` (r×out), each factor's rows
/// contiguous, so that every product with a row of `x` or of the gradient is `r` dot products
/// or `r` scaled rows added with fused multiply-adds (r is small: a matrix-product kernel
/// packs more than it saves at these shapes, and one pass over the rows keeps each row in cache
/// for all of them, where separate products read `x` and the gradient from memory four times).
struct LowRank<'a> {
    a: &'a [f32],
    bt: Vec<f32>,
    r: usize,
    fan_in: usize,
    fan_out: usize,
    scaling: f32,
    mask: &'a Option<DropMask>,
}

impl<'a> LowRank<'a> {
    fn new(
        a: &'a [f32],
        b: &[f32],
        dims: (usize, usize, usize),
        scaling: f32,
        mask: &'a Option<DropMask>,
    ) -> Self {
        let (r, fan_in, fan_out) = dims;
        Self {
            a,
            bt: transpose(b, fan_out, r, r),
            r,
            fan_in,
            fan_out,
            scaling,
            mask,
        }
    }

    fn a_row(&self, k: usize) -> &[f32] {
        &self.a[k * self.fan_in..(k + 1) * self.fan_in]
    }

    fn bt_row(&self, k: usize) -> &[f32] {
        &self.bt[k * self.fan_out..(k + 1) * self.fan_out]
    }

    /// Row `i` of `dropout(x)`: `x` itself without a mask, else written into `buf`.
    fn dropped<'b>(&self, i: usize, x: &'b [f32], buf: &'b mut [f32]) -> &'b [f32] {
        match self.mask {
            Some(m) => {
                m.row_into(i * self.fan_in, x, buf);
                buf
            }
            None => x,
        }
    }

    /// `y += scaling · dropout(x) Aᵀ Bᵀ` over the rows of `x` (n×in) and `y` (n×out).
    fn forward(&self, x: &[f32], y: &mut [f32]) {
        let (fi, fo) = (self.fan_in, self.fan_out);
        y.par_chunks_mut(LORA_ROWS * fo)
            .zip(x.par_chunks(LORA_ROWS * fi))
            .enumerate()
            .for_each(|(c, (y, x))| {
                let (mut buf, mut acc) = (vec![0f32; fi], vec![0f32; fo]);
                for (i, (y, x)) in y.chunks_mut(fo).zip(x.chunks(fi)).enumerate() {
                    let xd = self.dropped(c * LORA_ROWS + i, x, &mut buf);
                    acc.fill(0.0);
                    for k in 0..self.r {
                        let low = self.scaling * lane_dot(xd, self.a_row(k));
                        for (a, b) in acc.iter_mut().zip(self.bt_row(k)) {
                            *a = low.mul_add(*b, *a);
                        }
                    }
                    for (y, a) in y.iter_mut().zip(&acc) {
                        *y += a;
                    }
                }
            });
    }

    /// The backward pass over the rows of `x` (n×in) and `g` (n×out), with `gl = scaling · g B`
    /// and `low = scaling · dropout(x) Aᵀ` (n×r, one row at a time, never stored): `dx +=
    /// dropout(gl A)` (the same mask) where `dx` is given, and `(dA = glᵀ dropout(x), dB = gᵀ
    /// low)`, each task's sums over its rows added up in task order (the same result on any
    /// number of threads).
    fn backward(&self, x: &[f32], g: &[f32], dx: Option<&mut [f32]>) -> (Vec<f32>, Vec<f32>) {
        let (r, fi, fo) = (self.r, self.fan_in, self.fan_out);
        let tasks = (g.len() / fo).div_ceil(LORA_ROWS);
        let dxs: Vec<Option<&mut [f32]>> = match dx {
            Some(dx) => dx.chunks_mut(LORA_ROWS * fi).map(Some).collect(),
            None => (0..tasks).map(|_| None).collect(),
        };
        let parts: Vec<(Vec<f32>, Vec<f32>)> = dxs
            .into_par_iter()
            .zip(
                x.par_chunks(LORA_ROWS * fi)
                    .zip(g.par_chunks(LORA_ROWS * fo)),
            )
            .enumerate()
            .map(|(c, (mut dx, (x, g)))| {
                let (mut da, mut dbt) = (vec![0f32; r * fi], vec![0f32; r * fo]);
                let (mut buf, mut t) = (vec![0f32; fi], vec![0f32; fi]);
                for (i, (x, g)) in x.chunks(fi).zip(g.chunks(fo)).enumerate() {
                    let row = c * LORA_ROWS + i;
                    let xd = self.dropped(row, x, &mut buf);
                    let want_x = dx.is_some();
                    if want_x {
                        t.fill(0.0);
                    }
                    for k in 0..r {
                        let gl = self.scaling * lane_dot(g, self.bt_row(k));
                        let low = self.scaling * lane_dot(xd, self.a_row(k));
                        for (d, x) in da[k * fi..(k + 1) * fi].iter_mut().zip(xd) {
                            *d = gl.mul_add(*x, *d);
                        }
                        for (d, g) in dbt[k * fo..(k + 1) * fo].iter_mut().zip(g) {
                            *d = low.mul_add(*g, *d);
                        }
                        if want_x {
                            for (t, a) in t.iter_mut().zip(self.a_row(k)) {
                                *t = gl.mul_add(*a, *t);
                            }
                        }
                    }
                    if let Some(dx) = dx.as_deref_mut() {
                        let dx = &mut dx[i * fi..(i + 1) * fi];
                        match self.mask {
                            Some(m) => m.add_row(row * fi, &t, dx),
                            None => dx.iter_mut().zip(&t).for_each(|(d, t)| *d += t),
                        }
                    }
                }
                (da, dbt)
            })
            .collect();
        let (mut da, mut dbt) = (vec![0f32; r * fi], vec![0f32; r * fo]);
        for (pa, pb) in &parts {
            da.iter_mut().zip(pa).for_each(|(d, p)| *d += p);
            dbt.iter_mut().zip(pb).for_each(|(d, p)| *d += p);
        }
        (da, transpose(&dbt, r, fo, fo))
    }
}

impl FrozenLinear {
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
            LowRank::new(&a, &bm, (r, fan_in, fan_out), *scaling, mask).forward(&xs, &mut y);
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
        cpu_f32!(x => xv);
        let mut dx = if x.track_op() {
            Some(self.grad_x(&g, x)?)
        } else {
            None
        };
        let (da, db) = LowRank::new(&av, &bv, (r, fan_in, fan_out), *scaling, mask).backward(
            &xv,
            &g,
            dx.as_deref_mut(),
        );
        let gx = dx.map(|dx| tensor_from(dx, x)).transpose()?;
        let ga = a.track_op().then(|| tensor_from(da, a)).transpose()?;
        let gb = b.track_op().then(|| tensor_from(db, b)).transpose()?;
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
