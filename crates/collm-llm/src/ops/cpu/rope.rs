//! Rotary embeddings from per-row position tables (left or right padding).

use super::*;

/// cos/sin tables for a batch: (B·T, hd/2) each, from per-position ids.
#[derive(Clone)]
pub struct RopeTables {
    pub(super) cos: Arc<Vec<f32>>,
    pub(super) sin: Arc<Vec<f32>>,
    pub(super) half: usize,
    pub(super) rows: usize,
}

impl RopeTables {
    /// `positions` is (B·T) position ids; `inv_freq` has hd/2 entries.
    pub fn new(positions: &[f32], inv_freq: &[f32]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            half,
            rows: positions.len(),
        }
    }
}

impl RopeTables {
    /// Rotates one head vector `x` (hd) of row `r` in place (backwards when `inverse`: the
    /// transpose), with the tables rounded through `dtype` as a composed op in that dtype
    /// would read them.
    #[inline]
    pub(super) fn rotate(&self, x: &mut [f32], r: usize, inverse: bool, dtype: DType) {
        let half = self.half;
        let cos = &self.cos[r * half..(r + 1) * half];
        let sin = &self.sin[r * half..(r + 1) * half];
        let sign = if inverse { -1.0 } else { 1.0 };
        let (x1, x2) = x.split_at_mut(half);
        // Zipped, with the dtype test outside the loops: they vectorize.
        let pairs = x1.iter_mut().zip(x2.iter_mut()).zip(cos.iter().zip(sin));
        let turn = |(a, b): (&mut f32, &mut f32), c: f32, s: f32| {
            let (x, y) = (*a, *b);
            *a = x * c - y * s;
            *b = y * c + x * s;
        };
        if dtype == DType::BF16 {
            for (ab, (c, s)) in pairs {
                turn(ab, round(*c, dtype), sign * round(*s, dtype));
            }
        } else {
            for (ab, (c, s)) in pairs {
                turn(ab, *c, sign * s);
            }
        }
    }

    /// The tables of some rows: row `k` of the result is row `rows[k]` of these.
    pub fn rows(&self, rows: &[usize]) -> Self {
        let pick = |t: &[f32]| -> Vec<f32> {
            rows.iter()
                .flat_map(|&r| t[r * self.half..(r + 1) * self.half].iter().copied())
                .collect()
        };
        Self {
            cos: Arc::new(pick(&self.cos)),
            sin: Arc::new(pick(&self.sin)),
            half: self.half,
            rows: rows.len(),
        }
    }
}

struct Rope {
    t: RopeTables,
    /// Rotate backwards (the backward pass of a forward rotation).
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _span = times::span("rope");
        let dtype = s.dtype();
        let x = as_f32(s, l)?;
        let (half, rows) = (self.t.half, self.t.rows);
        let dims = l.shape().dims();
        // (B, T, heads, hd)
        if dims.len() != 4 || dims[0] * dims[1] != rows || dims[3] != 2 * half {
            bail!(
                "rope: input {dims:?} for tables of {rows} rows, hd {}",
                2 * half
            );
        }
        let per_row = dims[2] * dims[3];
        let mut y = x.into_owned();
        y.par_chunks_mut(per_row).enumerate().for_each(|(r, y)| {
            for y in y.chunks_mut(2 * half) {
                self.t.rotate(y, r, self.inverse, dtype);
            }
        });
        Ok((from_f32(y, dtype)?, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The rotation is orthogonal: its transpose is the rotation by −θ.
        let op = Rope {
            t: self.t.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1(op)?))
    }
}

/// Rotary embeddings (transformers' `rotate_half` convention) of `x`, (B, T, heads, hd).
pub fn rope(x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        t: tables.clone(),
        inverse: false,
    })
}
