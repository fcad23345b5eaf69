//! Attention of suffix rows over cached prompt prefixes, with a backward into the suffixes.

use super::*;

/// Attention of suffix rows over cached prompt prefixes and their own tokens (see
/// [`prefix_attention`]). One task per (row, kv head): its `rep` query heads form one
/// (rep·Ts × hd) block, so the prefix part is two matmuls per task with the prefix read in
/// place, forward and backward.
struct PrefixAttention {
    /// The suffixes' real tokens (n × Ts).
    mask: Mask,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Per prefix: keys (kv_heads, hd, Tp) and values (kv_heads, Tp, hd) as f32, and Tp.
    prefixes: Vec<(Vec<f32>, Vec<f32>, usize)>,
    /// Each suffix row's prefix.
    row_prefix: Vec<usize>,
}

/// What one (row, kv head) task of [`PrefixAttention`] reads: its queries (rep·Ts × hd,
/// head-major), its suffix keys and values (Ts × hd each) and its probabilities over
/// [prefix | suffix] keys (rep·Ts × Tk).
struct PrefixTask<'a> {
    qb: Vec<f32>,
    kb: Vec<f32>,
    vb: Vec<f32>,
    p: Vec<f32>,
    /// This task's prefix keys (hd × Tp) and values (Tp × hd).
    pk: &'a [f32],
    pv: &'a [f32],
    tp: usize,
}

impl PrefixAttention {
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    fn heads(&self, n: usize) -> Heads {
        Heads {
            batch: self.mask.batch,
            seq: self.mask.seq,
            n,
            hd: self.head_dim,
        }
    }

    /// Rows `(h, i)` of query heads `g·rep .. (g+1)·rep` of suffix row `r` of `x` (n, Ts, heads,
    /// hd), head-major: row (h, i) at (h·Ts + i)·hd. Queries, output gradients and outputs.
    fn gather_heads(&self, x: &[f32], r: usize, g: usize) -> Vec<f32> {
        let rep = self.heads / self.kv_heads;
        let heads = self.heads(self.heads);
        let mut out = Vec::with_capacity(rep * self.mask.seq * self.head_dim);
        for h in 0..rep {
            heads.gather_into(x, r, g * rep + h, &mut out);
        }
        out
    }

    /// kv head `g` of suffix row `r` of `x` (n, Ts, kv_heads, hd) as a (Ts × hd) block.
    fn gather_kv(&self, x: &[f32], r: usize, g: usize) -> Vec<f32> {
        self.heads(self.kv_heads).gather(x, r, g)
    }

    /// Task (r, g)'s inputs and its probabilities: every prefix key and the row's real suffix
    /// keys `j <= i` for query `i`.
    fn task<'a>(
        &'a self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        r: usize,
        g: usize,
    ) -> PrefixTask<'a> {
        let (ts, hd) = (self.mask.seq, self.head_dim);
        let (pkf, pvf, tp) = &self.prefixes[self.row_prefix[r]];
        let tp = *tp;
        let pk = &pkf[g * hd * tp..(g + 1) * hd * tp];
        let pv = &pvf[g * tp * hd..(g + 1) * tp * hd];
        let qb = self.gather_heads(q, r, g);
        let (kb, vb) = (self.gather_kv(k, r, g), self.gather_kv(v, r, g));
        let rows = qb.len() / hd;
        let tk = tp + ts;
        // Scores: [prefix | suffix] per query row, (rows × Tk).
        let mut p = vec![0f32; rows * tk];
        matmul(
            rows,
            tp,
            hd,
            &mut p,
            tk,
            false,
            &qb,
            (hd, 1),
            pk,
            (tp, 1),
            ::gemm::Parallelism::None,
        );
        matmul(
            rows,
            ts,
            hd,
            &mut p[tp..],
            tk,
            false,
            &qb,
            (hd, 1),
            &transpose(&kb, ts, hd, hd),
            (ts, 1),
            ::gemm::Parallelism::None,
        );
        let scale = self.scale();
        let m = &self.mask.data[r * ts..(r + 1) * ts];
        // Left or right padding: the real suffix keys are one run [start, end), and query i
        // reads the whole prefix and suffix keys [start, min(i + 1, end)): two runs, no test
        // per key (the same values as the general loop below).
        let start = m.iter().position(|&x| x == 1).unwrap_or(ts);
        let end = m.iter().rposition(|&x| x == 1).map_or(start, |e| e + 1);
        let one_run = m[start..end].iter().all(|&x| x == 1);
        for row in 0..rows {
            let i = row % ts;
            let sr = &mut p[row * tk..(row + 1) * tk];
            sr.iter_mut().for_each(|x| *x *= scale);
            if one_run {
                let hi = (i + 1).clamp(start, end);
                softmax_runs(sr, &[(0, tp), (tp + start, tp + hi)]);
            } else {
                masked_softmax(sr, |j| j < tp || (j - tp <= i && m[j - tp] == 1));
            }
        }
        PrefixTask {
            qb,
            kb,
            vb,
            p,
            pk,
            pv,
            tp,
        }
    }

    /// Per-task (rep·Ts × hd) blocks into (n, Ts, heads, hd).
    fn scatter_heads(&self, blocks: &[Vec<f32>]) -> Vec<f32> {
        let (ts, hd, nkv) = (self.mask.seq, self.head_dim, self.kv_heads);
        let rep = self.heads / nkv;
        self.heads(self.heads)
            .scatter(|r, h| &blocks[r * nkv + h / rep][(h % rep) * ts * hd..])
    }

    /// Per-task (Ts × hd) blocks into (n, Ts, kv_heads, hd).
    fn scatter_kv(&self, blocks: &[&[f32]]) -> Vec<f32> {
        let nkv = self.kv_heads;
        self.heads(nkv).scatter(|r, g| blocks[r * nkv + g])
    }
}

impl CustomOp3 for PrefixAttention {
    fn name(&self) -> &'static str {
        "prefix-attention"
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
        let _span = times::span("prefix attention fwd");
        let dtype = qs.dtype();
        let (q, k, v) = (as_f32(qs, ql)?, as_f32(ks, kl)?, as_f32(vs, vl)?);
        let (n, ts, nkv, hd) = (self.mask.batch, self.mask.seq, self.kv_heads, self.head_dim);
        let blocks: Vec<Vec<f32>> = (0..n * nkv)
            .into_par_iter()
            .map(|task| {
                let t = self.task((&q, &k, &v), task / nkv, task % nkv);
                let (rows, tk) = (t.qb.len() / hd, t.tp + ts);
                // Out = P_prefix · V_prefix + P_suffix · V_suffix.
                let mut o = vec![0f32; rows * hd];
                matmul(
                    rows,
                    hd,
                    t.tp,
                    &mut o,
                    hd,
                    false,
                    &t.p,
                    (tk, 1),
                    t.pv,
                    (hd, 1),
                    ::gemm::Parallelism::None,
                );
                matmul(
                    rows,
                    hd,
                    ts,
                    &mut o,
                    hd,
                    true,
                    &t.p[t.tp..],
                    (tk, 1),
                    &t.vb,
                    (hd, 1),
                    ::gemm::Parallelism::None,
                );
                o
            })
            .collect();
        let out = self.scatter_heads(&blocks);
        Ok((from_f32(out, dtype)?, ql.shape().clone()))
    }

    /// Gradients of the suffixes' q, k and v (the prefixes are constants: nothing trained acts
    /// on them), the probabilities recomputed per task as in [`Attention`]'s backward.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = times::span("prefix attention bwd");
        cpu_f32!(q => qv);
        cpu_f32!(k => kv);
        cpu_f32!(v => vv);
        cpu_f32!(res => o);
        cpu_f32!(grad => dout);
        let (n, ts, nkv, hd) = (self.mask.batch, self.mask.seq, self.kv_heads, self.head_dim);
        let scale = self.scale();
        let per: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..n * nkv)
            .into_par_iter()
            .map(|task| {
                let (r, g) = (task / nkv, task % nkv);
                let t = self.task((&qv, &kv, &vv), r, g);
                let (rows, tp) = (t.qb.len() / hd, t.tp);
                let tk = tp + ts;
                let dob = self.gather_heads(&dout, r, g);
                let ob = self.gather_heads(&o, r, g);
                // dP = dO · [V_prefix | V_suffix]ᵀ (rows × Tk).
                let mut ds = vec![0f32; rows * tk];
                matmul(
                    rows,
                    tp,
                    hd,
                    &mut ds,
                    tk,
                    false,
                    &dob,
                    (hd, 1),
                    &transpose(t.pv, tp, hd, hd),
                    (tp, 1),
                    ::gemm::Parallelism::None,
                );
                matmul(
                    rows,
                    ts,
                    hd,
                    &mut ds[tp..],
                    tk,
                    false,
                    &dob,
                    (hd, 1),
                    &transpose(&t.vb, ts, hd, hd),
                    (ts, 1),
                    ::gemm::Parallelism::None,
                );
                // dS = P ∘ (dP − rowsum(dO ∘ O)) · scale.
                for row in 0..rows {
                    let d = &dob[row * hd..(row + 1) * hd];
                    let di = lane_dot(d, &ob[row * hd..(row + 1) * hd]);
                    let pr = &t.p[row * tk..(row + 1) * tk];
                    for (x, &p) in ds[row * tk..(row + 1) * tk].iter_mut().zip(pr) {
                        *x = p * (*x - di) * scale;
                    }
                }
                // dQ = dS_prefix · K_prefix + dS_suffix · K_suffix (K_prefix (j, d) at d·Tp + j).
                let mut dq = vec![0f32; rows * hd];
                matmul(
                    rows,
                    hd,
                    tp,
                    &mut dq,
                    hd,
                    false,
                    &ds,
                    (tk, 1),
                    t.pk,
                    (1, tp),
                    ::gemm::Parallelism::None,
                );
                matmul(
                    rows,
                    hd,
                    ts,
                    &mut dq,
                    hd,
                    true,
                    &ds[tp..],
                    (tk, 1),
                    &t.kb,
                    (hd, 1),
                    ::gemm::Parallelism::None,
                );
                // dK_suffix = dS_suffixᵀ · Q, dV_suffix = P_suffixᵀ · dO (summed over the
                // task's query heads).
                let mut dk = vec![0f32; ts * hd];
                matmul(
                    ts,
                    hd,
                    rows,
                    &mut dk,
                    hd,
                    false,
                    &ds[tp..],
                    (1, tk),
                    &t.qb,
                    (hd, 1),
                    ::gemm::Parallelism::None,
                );
                let mut dv = vec![0f32; ts * hd];
                matmul(
                    ts,
                    hd,
                    rows,
                    &mut dv,
                    hd,
                    false,
                    &t.p[tp..],
                    (1, tk),
                    &dob,
                    (hd, 1),
                    ::gemm::Parallelism::None,
                );
                (dq, dk, dv)
            })
            .collect();
        let dq: Vec<Vec<f32>> = per.iter().map(|x| x.0.clone()).collect();
        let dq = self.scatter_heads(&dq);
        let dk = self.scatter_kv(&per.iter().map(|x| x.1.as_slice()).collect::<Vec<_>>());
        let dv = self.scatter_kv(&per.iter().map(|x| x.2.as_slice()).collect::<Vec<_>>());
        Ok((
            Some(tensor_from(dq, q)?),
            Some(tensor_from(dk, k)?),
            Some(tensor_from(dv, v)?),
        ))
    }
}

/// Attention of suffix rows over cached prompt prefixes and their own tokens, on the CPU, with
/// its backward pass (into the suffixes' q, k and v; the prefixes are constants). The composed
/// reference is [`composed::prefix_attention`]. `q` (n, Ts, heads, hd), `k`, `v` (n, Ts,
/// kv_heads, hd), all after RoPE; `mask` (n × Ts) marks the suffixes' real tokens; `prefixes`
/// lists, in row order, each run of rows that continues one prefix: its keys (kv_heads, hd,
/// Tp) and values (kv_heads, Tp, hd) (all real) and the run's row count. Query `i` of a row
/// attends to every key of its prefix and to the row's real suffix keys `j <= i`.
pub fn prefix_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    prefixes: &[(&Tensor, &Tensor, usize)],
) -> Result<Tensor> {
    let (n, ts, nh, hd) = q.dims4()?;
    let nkv = k.dim(2)?;
    let rows: usize = prefixes.iter().map(|p| p.2).sum();
    let shapes_ok = prefixes.iter().all(|(pk, pv, _)| {
        let tp = pk.dims().get(2).copied().unwrap_or(0);
        tp > 0 && pk.dims() == [nkv, hd, tp] && pv.dims() == [nkv, tp, hd]
    });
    if (mask.batch, mask.seq) != (n, ts)
        || nkv == 0
        || nh % nkv != 0
        || k.dims() != [n, ts, nkv, hd]
        || v.dims() != k.dims()
        || rows != n
        || !shapes_ok
    {
        bail!(
            "prefix attention: q {:?}, k {:?}, v {:?}, mask {}x{}, {} prefixes over {rows} rows",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.batch,
            mask.seq,
            prefixes.len()
        );
    }
    let flat =
        |x: &Tensor| -> Result<Vec<f32>> { x.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
    let mut row_prefix = Vec::with_capacity(n);
    let mut kept = Vec::with_capacity(prefixes.len());
    for (p, (pk, pv, count)) in prefixes.iter().enumerate() {
        kept.push((flat(pk)?, flat(pv)?, pk.dim(2)?));
        row_prefix.extend(std::iter::repeat_n(p, *count));
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        PrefixAttention {
            mask: mask.clone(),
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            prefixes: kept,
            row_prefix,
        },
    )
}
