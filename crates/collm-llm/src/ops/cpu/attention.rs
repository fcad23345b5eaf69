//! Causal attention with a per-row key mask, RoPE inside, grouped-query heads read in place.

use super::bf16::{products_serial, Kernel, Panels};
use super::*;

struct Attention {
    mask: Mask,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    /// RoPE applied to q and k inside the kernel (so the rotated copies are never stored).
    rope: Option<RopeTables>,
    /// A bf16 kernel multiplies `Q Kᵀ` and `P V` of the forward pass (the decoder's projection
    /// kernel); f32 otherwise, and always in the backward pass.
    kernel: Kernel,
}

impl Attention {
    /// Inputs are (B, T, heads, hd) or, heads side by side, (B, T, heads·hd).
    fn dims(&self, l: &Layout, heads: usize) -> Result<()> {
        let want = [self.mask.batch, self.mask.seq, heads, self.head_dim];
        let flat = [self.mask.batch, self.mask.seq, heads * self.head_dim];
        let dims = l.shape().dims();
        if dims != want && dims != flat {
            bail!(
                "attention: input {:?}, expected {want:?} or {flat:?}",
                l.shape()
            );
        }
        Ok(())
    }

    /// Head `h` of batch row `b` of `x` (B, T, n, hd) as a contiguous (T×hd) block, rotated
    /// by RoPE when `rotate` and the op has tables.
    fn gather(&self, x: &[f32], n: usize, b: usize, h: usize, rotate: bool) -> Vec<f32> {
        let mut out = self.heads(n).gather(x, b, h);
        if rotate {
            self.rotate(&mut out, b, false);
        }
        out
    }

    fn heads(&self, n: usize) -> Heads {
        Heads {
            batch: self.mask.batch,
            seq: self.mask.seq,
            n,
            hd: self.head_dim,
        }
    }

    /// Applies RoPE (or its inverse) in place to a (T×hd) block of batch row `b`. The tables
    /// are read in f32 (the rotation happens inside the kernel, in f32).
    fn rotate(&self, blk: &mut [f32], b: usize, inverse: bool) {
        let Some(rope) = &self.rope else {
            return;
        };
        let (t, hd) = (self.mask.seq, self.head_dim);
        for (i, x) in blk.chunks_mut(hd).enumerate().take(t) {
            rope.rotate(x, b * t + i, inverse, DType::F32);
        }
    }

    /// Probabilities of query rows of one (batch row, head): `p` is T×T, row `i` over keys
    /// `0..=i` that are real; rows without a real key are all zero. `p` holds the scaled
    /// scores on entry.
    fn softmax_rows(&self, b: usize, p: &mut [f32]) {
        if wide_lanes() {
            // SAFETY: the CPU has AVX-512F (checked).
            unsafe { self.softmax_rows_avx512(b, p) }
        } else {
            self.softmax_rows_in(b, p)
        }
    }

    /// [`Self::softmax_rows_in`] compiled for AVX-512: the element-wise loops (the exponentials)
    /// in 16 lanes; the same operations on each element and the sums in the same 8 lanes, so
    /// the same values as the AVX2 build.
    #[target_feature(enable = "avx512f")]
    unsafe fn softmax_rows_avx512(&self, b: usize, p: &mut [f32]) {
        self.softmax_rows_in(b, p)
    }

    #[inline(always)]
    fn softmax_rows_in(&self, b: usize, p: &mut [f32]) {
        let t = self.mask.seq;
        let m = &self.mask.data[b * t..(b + 1) * t];
        // Left or right padding: the real keys are one run [start, end), and query i reads
        // keys [start, min(i + 1, end)) with no test per key (so the loops vectorize).
        // The same values, summed in the same order, as the general loop below.
        let start = m.iter().position(|&x| x == 1).unwrap_or(t);
        let end = m.iter().rposition(|&x| x == 1).map_or(start, |e| e + 1);
        if m[start..end].iter().all(|&x| x == 1) {
            for i in 0..t {
                let row = &mut p[i * t..(i + 1) * t];
                let hi = (i + 1).min(end);
                if hi <= start {
                    row.fill(0.0);
                    continue;
                }
                row[..start].fill(0.0);
                row[hi..].fill(0.0);
                let keys = &mut row[start..hi];
                let max = lane_max(keys);
                for v in keys.iter_mut() {
                    *v = exp(*v - max);
                }
                // Over the row from 0 (zeros before `start`): the general loop's sum exactly.
                let inv = 1.0 / lane_sum(&row[..hi]);
                for v in row[start..hi].iter_mut() {
                    *v *= inv;
                }
            }
            return;
        }
        for i in 0..t {
            masked_softmax(&mut p[i * t..(i + 1) * t], |j| j <= i && m[j] == 1);
        }
    }

    /// The first real key of batch row `b` (keys and queries before it are padding) and the
    /// causal row blocks from there: block [r0, r1) of queries needs keys [start, r1) only.
    fn blocks(&self, b: usize) -> (usize, Vec<(usize, usize)>) {
        const ROWS: usize = 32;
        let t = self.mask.seq;
        let m = &self.mask.data[b * t..(b + 1) * t];
        let start = m.iter().position(|&x| x == 1).unwrap_or(t);
        let blocks = (start..t)
            .step_by(ROWS)
            .map(|r0| (r0, (r0 + ROWS).min(t)))
            .collect();
        (start, blocks)
    }

    /// P = masked softmax(Q Kᵀ·scale) for one (batch row, head), from a contiguous (T×hd)
    /// block of queries and the keys transposed (hd×T, [`transpose`]); only the causal blocks
    /// of scores are computed.
    fn probs(&self, qb: &[f32], kt: &[f32], b: usize, p: &mut [f32]) {
        let (t, hd) = (self.mask.seq, self.head_dim);
        let (start, blocks) = self.blocks(b);
        for &(r0, r1) in &blocks {
            // S[r0..r1, start..r1] = Q[r0..r1] · Kᵀ[.., start..r1]
            matmul(
                r1 - r0,
                r1 - start,
                hd,
                &mut p[r0 * t + start..],
                t,
                false,
                &qb[r0 * hd..],
                (hd, 1),
                &kt[start..],
                (t, 1),
                ::gemm::Parallelism::None,
            );
            for i in r0..r1 {
                for v in &mut p[i * t + start..i * t + r1] {
                    *v *= self.scale;
                }
            }
        }
        self.softmax_rows(b, p);
    }
}

impl Attention {
    /// The forward pass with a bf16 kernel, per (batch row, kv head): its keys (rotated) and
    /// values packed once for its query heads; `S = Q Kᵀ` and `O = P V` with `Q` and `P`
    /// rounded to bf16 and products accumulated in f32 (softmax in f32). The whole `T×T` of
    /// scores is multiplied (the masked part is dropped by the softmax): at these lengths the
    /// bf16 products cost less than skipping blocks saves. (B, T, nh, hd) blocks, as `cpu_fwd`.
    fn forward_bf16(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<Vec<Vec<f32>>> {
        let (bsz, t, nh, nkv, hd) = (
            self.mask.batch,
            self.mask.seq,
            self.heads,
            self.kv_heads,
            self.head_dim,
        );
        let rep = nh / nkv;
        (0..bsz * nkv)
            .into_par_iter()
            .map(|bk| {
                let (b, kh) = (bk / nkv, bk % nkv);
                let kb = self.gather(k, nkv, b, kh, true);
                let vb = self.gather(v, nkv, b, kh, false);
                let kt = Panels::from_cols(&kb, hd, t, hd);
                let vp = Panels::from_rows(&vb, t, hd, hd);
                (kh * rep..(kh + 1) * rep)
                    .map(|h| {
                        let qb = self.gather(q, nh, b, h, true);
                        let mut p = products_serial(self.kernel, &qb, t, &[&kt])
                            .pop()
                            .expect("one product");
                        p.iter_mut().for_each(|s| *s *= self.scale);
                        self.softmax_rows(b, &mut p);
                        products_serial(self.kernel, &p, t, &[&vp])
                            .pop()
                            .expect("one product")
                    })
                    .collect()
            })
            .collect()
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = times::span("attention fwd");
        self.dims(ql, self.heads)?;
        self.dims(kl, self.kv_heads)?;
        self.dims(vl, self.kv_heads)?;
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            bail!(
                "attention: {} heads over {} kv heads",
                self.heads,
                self.kv_heads
            );
        }
        if let Some(r) = &self.rope {
            if r.rows != self.mask.batch * self.mask.seq || 2 * r.half != self.head_dim {
                bail!("attention: RoPE tables do not match the input");
            }
        }
        let dtype = qs.dtype();
        let (q, k, v) = (as_f32(qs, ql)?, as_f32(ks, kl)?, as_f32(vs, vl)?);
        let (bsz, t, nh, nkv, hd) = (
            self.mask.batch,
            self.mask.seq,
            self.heads,
            self.kv_heads,
            self.head_dim,
        );
        let rep = nh / nkv;
        if self.kernel.is_bf16() {
            let per = self.forward_bf16(&q, &k, &v);
            let out = self
                .heads(nh)
                .scatter(|b, h| &per[b * nkv + h / rep][h % rep]);
            return Ok((from_f32(out, dtype)?, ql.shape().clone()));
        }
        // One (t×hd) output block per (b, h), written into (B, T, nh, hd) afterwards.
        // P (T×T) per rayon job: the softmax writes every row of it.
        let blocks: Vec<Vec<f32>> = (0..bsz * nh)
            .into_par_iter()
            .map_init(
                || vec![0f32; t * t],
                |p, bh| {
                    let (b, h) = (bh / nh, bh % nh);
                    let qb = self.gather(&q, nh, b, h, true);
                    let kb = self.gather(&k, nkv, b, h / rep, true);
                    self.probs(&qb, &transpose(&kb, t, hd, hd), b, p);
                    let mut o = vec![0f32; t * hd];
                    let (start, blocks) = self.blocks(b);
                    let v0 = b * t * nkv * hd + (h / rep) * hd;
                    for &(r0, r1) in &blocks {
                        // O[r0..r1] = P[r0..r1, start..r1] · V[start..r1]
                        matmul(
                            r1 - r0,
                            hd,
                            r1 - start,
                            &mut o[r0 * hd..],
                            hd,
                            false,
                            &p[r0 * t + start..],
                            (t, 1),
                            &v[v0 + start * nkv * hd..],
                            (nkv * hd, 1),
                            ::gemm::Parallelism::None,
                        );
                    }
                    o
                },
            )
            .collect();
        let out = self.heads(nh).scatter(|b, h| &blocks[b * nh + h]);
        Ok((from_f32(out, dtype)?, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = times::span("attention bwd");
        cpu_f32!(q => qv);
        cpu_f32!(k => kv);
        cpu_f32!(v => vv);
        cpu_f32!(res => o);
        cpu_f32!(grad => dout);
        let (bsz, t, nh, nkv, hd) = (
            self.mask.batch,
            self.mask.seq,
            self.heads,
            self.kv_heads,
            self.head_dim,
        );
        let rep = nh / nkv;
        // Work per (b, kv head): its `rep` query heads share K and V, so dK and dV are summed
        // there without races. Results are (t×hd) blocks, rotated back (the transpose of
        // RoPE) and scattered afterwards.
        type Blocks = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
        // P and dP (T×T) per rayon job, not per (b, kv head): every block that is read is
        // written first (P's rows by the softmax, dP's blocks by their products).
        let per: Vec<Blocks> = (0..bsz * nkv)
            .into_par_iter()
            .map_init(
                || (vec![0f32; t * t], vec![0f32; t * t]),
                |(p, dp), bk| {
                    let (b, kh) = (bk / nkv, bk % nkv);
                    let kb = self.gather(&kv, nkv, b, kh, true);
                    let kt = transpose(&kb, t, hd, hd);
                    let v0 = b * t * nkv * hd + kh * hd;
                    let vt = transpose(&vv[v0..], t, hd, nkv * hd);
                    let mut dk = vec![0f32; t * hd];
                    let mut dv = vec![0f32; t * hd];
                    let mut dqs = Vec::with_capacity(rep);
                    let (start, blocks) = self.blocks(b);
                    for h in kh * rep..(kh + 1) * rep {
                        let q0 = b * t * nh * hd + h * hd;
                        let qb = self.gather(&qv, nh, b, h, true);
                        self.probs(&qb, &kt, b, p);
                        for &(r0, r1) in &blocks {
                            let (m, n) = (r1 - r0, r1 - start);
                            // dV[start..r1] += P[r0..r1, start..r1]ᵀ dO[r0..r1]
                            matmul(
                                n,
                                hd,
                                m,
                                &mut dv[start * hd..],
                                hd,
                                true,
                                &p[r0 * t + start..],
                                (1, t),
                                &dout[q0 + r0 * nh * hd..],
                                (nh * hd, 1),
                                ::gemm::Parallelism::None,
                            );
                            // dP[r0..r1, start..r1] = dO[r0..r1] Vᵀ[.., start..r1]
                            matmul(
                                m,
                                n,
                                hd,
                                &mut dp[r0 * t + start..],
                                t,
                                false,
                                &dout[q0 + r0 * nh * hd..],
                                (nh * hd, 1),
                                &vt[start..],
                                (t, 1),
                                ::gemm::Parallelism::None,
                            );
                        }
                        // dS = P ∘ (dP − rowsum(dO ∘ O)) · scale, over the computed blocks
                        // (P is zero past the diagonal, so dS is too).
                        for &(r0, r1) in &blocks {
                            for i in r0..r1 {
                                let r = q0 + i * nh * hd;
                                let di = lane_dot(&dout[r..r + hd], &o[r..r + hd]);
                                let (pr, dr) = (
                                    &p[i * t + start..i * t + r1],
                                    &mut dp[i * t + start..i * t + r1],
                                );
                                for (d, p) in dr.iter_mut().zip(pr) {
                                    *d = p * (*d - di) * self.scale;
                                }
                            }
                        }
                        let mut dq = vec![0f32; t * hd];
                        for &(r0, r1) in &blocks {
                            let (m, n) = (r1 - r0, r1 - start);
                            // dQ[r0..r1] = dS[r0..r1, start..r1] K[start..r1]
                            matmul(
                                m,
                                hd,
                                n,
                                &mut dq[r0 * hd..],
                                hd,
                                false,
                                &dp[r0 * t + start..],
                                (t, 1),
                                &kb[start * hd..],
                                (hd, 1),
                                ::gemm::Parallelism::None,
                            );
                            // dK[start..r1] += dS[r0..r1, start..r1]ᵀ Q[r0..r1]
                            matmul(
                                n,
                                hd,
                                m,
                                &mut dk[start * hd..],
                                hd,
                                true,
                                &dp[r0 * t + start..],
                                (1, t),
                                &qb[r0 * hd..],
                                (hd, 1),
                                ::gemm::Parallelism::None,
                            );
                        }
                        self.rotate(&mut dq, b, true);
                        dqs.push(dq);
                    }
                    self.rotate(&mut dk, b, true);
                    (dqs, dk, dv)
                },
            )
            .collect();
        let dq = self
            .heads(nh)
            .scatter(|b, h| &per[b * nkv + h / rep].0[h % rep]);
        let dk = self.heads(nkv).scatter(|b, kh| &per[b * nkv + kh].1);
        let dv = self.heads(nkv).scatter(|b, kh| &per[b * nkv + kh].2);
        Ok((
            Some(tensor_from(dq, q)?),
            Some(tensor_from(dk, k)?),
            Some(tensor_from(dv, v)?),
        ))
    }
}

/// Causal attention of `q` (B, T, heads, hd) over `k`, `v` (B, T, kv_heads, hd), masked per
/// row by `mask`, scaled by `1/sqrt(hd)`; with `rope`, q and k are rotated first (inside the
/// kernel: `attention(q, k, v, m, Some(t))` = `attention(rope(q, t), rope(k, t), v, m, None)`).
/// Returns (B, T, heads, hd). Query rows with no real key (padding before a row's first
/// token) get zeros.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    rope: Option<&RopeTables>,
) -> Result<Tensor> {
    let (_, _, heads, _) = q.dims4()?;
    attention_flat(q, k, v, (heads, k.dim(2)?), mask, rope, Kernel::F32)
}

/// [`attention`] for `q` (B, T, heads·hd) and `k`, `v` (B, T, kv_heads·hd), heads side by
/// side, as the projections give them; returns (B, T, heads·hd), as the output projection
/// takes it (4-d inputs work too and give a 4-d output). The decoder's path: no reshape nodes
/// around the op, each of which would cost a full-size gradient copy in candle's backward pass.
/// With a bf16 `kernel`, the forward pass multiplies `Q Kᵀ` and `P V` with it.
pub fn attention_flat(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (heads, kv_heads): (usize, usize),
    mask: &Mask,
    rope: Option<&RopeTables>,
    kernel: Kernel,
) -> Result<Tensor> {
    let width = q.dims().iter().skip(2).product::<usize>();
    if heads == 0 || !width.is_multiple_of(heads) {
        bail!(
            "attention: {:?} does not split into {heads} heads",
            q.shape()
        );
    }
    let hd = width / heads;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            mask: mask.clone(),
            heads,
            kv_heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            rope: rope.cloned(),
            kernel,
        },
    )
}
