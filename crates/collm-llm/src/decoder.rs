//! The LLaMA-family decoder, shaped like the model (candle-transformers' `llama.rs`):
//! [`Decoder`] → `Block` (RMSNorm, `Attention`, RMSNorm, `Mlp`) → `Linear` projections, each
//! with `load` and `forward`. What CoLLM needs and ready-made model files lack:
//! - a forward pass from **input embeddings** (so ID slots can hold mapped collaborative
//!   vectors), for batches of different lengths with a per-row attention mask — left or right
//!   padding; position ids follow the mask;
//! - scoring that computes logits only for chosen token ids at each row's last real position;
//! - LoRA on any projection: each `Linear` knows its (layer, [`Module`]) and takes its pair from
//!   the pass's adapter by index, so one loaded backbone serves any adapter (step 1's, step 2's
//!   frozen one, none);
//! - a backward pass through everything (for LoRA, injected embeddings, the CIE mapper).
//!
//! Two implementations of the same maths: on the CPU the fused ops of [`crate::ops`] (one
//! kernel each for RMSNorm, attention with RoPE, SwiGLU, dropout and the frozen projection with
//! its LoRA, each with its own backward); elsewhere (CUDA) the composed candle ops of
//! [`crate::ops::composed`], with the attention bias and dropout masks made on the device.
//! Tests run both and compare them, in inference and in training (same dropout masks).

use crate::config::LlamaConfig;
use crate::load::Weights;
use crate::lora::{Lora, Module};
use crate::ops::{self, composed, KeyMask, RopeTables};
use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, Shape, Tensor, D};
use collm_nn::TrainCtx;
use rand::Rng;

/// The training path's frozen projection: the forward pass hands through `y`, already computed
/// from a detached input; the backward pass gives the input `x` its gradient `grad · W` and the
/// weight none. Candle's matmul backward always computes both operands' gradients, which for a
/// frozen weight is a third of a training step's matmul FLOPs spent on a result nobody reads.
struct FrozenWeight {
    w: Tensor,
}

impl FrozenWeight {
    fn check(l: &Layout) -> candle_core::Result<()> {
        // try_clone copies the whole buffer, so `y` must be exactly its buffer (it is: it is
        // a fresh matmul result).
        if !l.is_contiguous() || l.start_offset() != 0 {
            candle_core::bail!("frozen-weight: the projection output must be contiguous");
        }
        Ok(())
    }
}

impl CustomOp2 for FrozenWeight {
    fn name(&self) -> &'static str {
        "frozen-weight"
    }
    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::check(yl)?;
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }
    fn cuda_fwd(
        &self,
        _x: &CudaStorage,
        _xl: &Layout,
        y: &CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Self::check(yl)?;
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&self.w)?), None))
    }
}

/// Which positions of a padded batch are real tokens.
#[derive(Debug, Clone)]
pub struct Mask {
    pub batch: usize,
    pub seq: usize,
    /// Row-major (batch, seq); 1 = real token.
    pub data: Vec<u8>,
}

impl Mask {
    /// Left padding: row `k` holds `lens[k]` real tokens at its end.
    pub fn left_padded(lens: &[usize], seq: usize) -> Self {
        let mut data = vec![0u8; lens.len() * seq];
        for (k, &l) in lens.iter().enumerate() {
            data[k * seq + seq - l..(k + 1) * seq].fill(1);
        }
        Self {
            batch: lens.len(),
            seq,
            data,
        }
    }

    /// Right padding: row `k` holds `lens[k]` real tokens at its start.
    pub fn right_padded(lens: &[usize], seq: usize) -> Self {
        let mut data = vec![0u8; lens.len() * seq];
        for (k, &l) in lens.iter().enumerate() {
            data[k * seq..k * seq + l].fill(1);
        }
        Self {
            batch: lens.len(),
            seq,
            data,
        }
    }

    /// Each row's last real position.
    pub fn last_positions(&self) -> Vec<usize> {
        (0..self.batch)
            .map(|b| {
                (0..self.seq)
                    .rev()
                    .find(|&t| self.data[b * self.seq + t] == 1)
                    .unwrap_or(self.seq - 1)
            })
            .collect()
    }

    /// Position ids that follow the mask: the k-th real token of a row has position k.
    pub fn position_ids(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.batch * self.seq];
        for b in 0..self.batch {
            let mut p = 0f32;
            for t in 0..self.seq {
                // Padding takes the position of the next real token; it is masked anyway.
                out[b * self.seq + t] = p;
                if self.data[b * self.seq + t] == 1 {
                    p += 1.0;
                }
            }
        }
        out
    }

    /// Position ids of rows that continue prefixes of `offsets[b]` tokens.
    pub fn position_ids_after(&self, offsets: &[usize]) -> Vec<f32> {
        let mut p = self.position_ids();
        for (row, &o) in offsets.iter().enumerate() {
            for x in &mut p[row * self.seq..(row + 1) * self.seq] {
                *x += o as f32;
            }
        }
        p
    }

    /// The mask in the form the fused attention kernel reads.
    pub fn key_mask(&self) -> KeyMask {
        KeyMask {
            data: std::sync::Arc::new(self.data.clone()),
            batch: self.batch,
            seq: self.seq,
        }
    }
}

/// Options of one forward pass.
pub struct Pass<'a> {
    pub lora: Option<&'a Lora>,
    /// `Some` in training: LoRA dropout, and differentiable ops everywhere.
    pub train: Option<&'a TrainCtx>,
    /// Build the graph for backpropagation (into LoRA, injected embeddings, …) even when
    /// `train` is None (e.g. a gradient check without dropout).
    pub grad: bool,
}

impl Pass<'_> {
    pub fn inference() -> Pass<'static> {
        Pass {
            lora: None,
            train: None,
            grad: false,
        }
    }
    fn needs_grad(&self) -> bool {
        self.grad || self.train.is_some()
    }
}

/// One position per batch row of a (B, T, ·) activation, for the last block of
/// [`Decoder::forward_at`]: row `r`'s position is `flat[r] - r·seq`.
struct Rows {
    seq: usize,
    /// `r·seq + position`: the rows' indices in the (B·T, ·) activation.
    flat: Vec<usize>,
}

impl Rows {
    fn new(seq: usize, positions: &[usize]) -> Self {
        Self {
            seq,
            flat: positions
                .iter()
                .enumerate()
                .map(|(r, &p)| r * seq + p)
                .collect(),
        }
    }

    /// B·T: the rows of the whole activation.
    fn all(&self) -> usize {
        self.flat.len() * self.seq
    }

    fn index(&self, dev: &Device) -> Result<Tensor> {
        let idx: Vec<u32> = self.flat.iter().map(|&i| i as u32).collect();
        Ok(Tensor::from_vec(idx, self.flat.len(), dev)?)
    }

    /// The chosen rows of `x` (B, T, …) as (B, 1, …).
    fn pick(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let mut flat = vec![self.all()];
        flat.extend_from_slice(&dims[2..]);
        let mut out = vec![self.flat.len(), 1];
        out.extend_from_slice(&dims[2..]);
        Ok(x.reshape(flat)?
            .index_select(&self.index(x.device())?, 0)?
            .reshape(out)?)
    }
}

/// What every layer of one forward pass shares: the pass, the path, the mask and the RoPE
/// tables in the form that path uses.
struct Ctx<'a> {
    pass: &'a Pass<'a>,
    eps: f64,
    /// Fused CPU kernels for the projections, norms and SwiGLU.
    fused: bool,
    attn: Attn<'a>,
}

enum Attn<'a> {
    Fused {
        rope: RopeTables,
        mask: KeyMask,
    },
    Composed {
        /// (B, T, 1, hd) each.
        cos: Tensor,
        sin: Tensor,
        /// Additive (B, 1, T, T).
        bias: Tensor,
    },
    /// Suffixes attending to cached prefixes (see [`PrefixCache`]); the prefixes are constants.
    Cached {
        rope: CachedRope,
        cache: &'a PrefixCache,
        /// Consecutive runs of suffix rows: (prefix index, row count).
        groups: &'a [(usize, usize)],
    },
}

/// RoPE and masking of the suffix path: the fused CPU kernels or composed candle ops.
enum CachedRope {
    Fused {
        /// Positions continue each row's prefix.
        tables: RopeTables,
        /// The suffixes' real tokens (B × Ts).
        mask: KeyMask,
    },
    Composed {
        cos: Tensor,
        sin: Tensor,
        /// Additive (B, 1, Ts, Ts): causal and key padding within the suffixes.
        bias: Tensor,
    },
}

impl Ctx<'_> {
    /// The fused path's LoRA dropout mask for `n` inputs: the draws of [`Ctx::dropout`] (so
    /// runs and checkpoints replay the same masks on either path); `None` when not training.
    fn dropout_mask(&self, n: usize, p: f64) -> Result<Option<ops::DropMask>> {
        match self.pass.train {
            Some(train) if p > 0.0 => {
                Ok(Some(ops::dropout_mask(n, p, &mut train.rng.borrow_mut())?))
            }
            _ => Ok(None),
        }
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        rms_norm(self.fused, self.pass.needs_grad(), x, w, self.eps)
    }

    /// LoRA dropout. On the CPU: the same draws from the step's `TrainCtx` generator as the
    /// composed `collm_nn::layers::dropout` (so resumed and older runs see the same masks),
    /// drawn in parallel and kept as bits. On other devices: a mask drawn there (no host
    /// draws, no upload) from the device generator seeded from the step's generator.
    fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let Some(train) = self.pass.train else {
            return Ok(x.clone());
        };
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let dev = x.device();
        let mut rng = train.rng.borrow_mut();
        Ok(match dev {
            Device::Cpu => ops::dropout(x, p, &mut rng)?,
            _ => {
                dev.set_seed(rng.gen())?;
                let keep = Tensor::rand(0f32, 1f32, x.shape(), dev)?
                    .ge(p)?
                    .to_dtype(x.dtype())?;
                (x * keep)?.affine(1.0 / (1.0 - p), 0.0)?
            }
        })
    }
}

fn rms_norm(fused: bool, grad: bool, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(if fused {
        ops::rms_norm(x, w, eps)?
    } else if !grad && x.dtype() == DType::F32 {
        // candle's kernel records no backward pass: only where none is needed.
        candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?
    } else {
        composed::rms_norm(x, w, eps)?
    })
}

/// A frozen projection `y = x Wᵀ (+ b)`, adapted by the pass's LoRA pair for its site.
struct Linear {
    w: Tensor,
    b: Option<Tensor>,
    layer: usize,
    module: Module,
}

impl Linear {
    fn load(
        ws: &Weights,
        name: &str,
        (fan_in, fan_out): (usize, usize),
        bias: bool,
        (layer, module): (usize, Module),
    ) -> Result<Self> {
        Ok(Self {
            w: ws.get(&format!("{name}.weight"), &[fan_out, fan_in])?,
            b: if bias {
                Some(ws.get(&format!("{name}.bias"), &[fan_out])?)
            } else {
                None
            },
            layer,
            module,
        })
    }

    /// `x` (B, T, in) → (B, T, out).
    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.forward_rows(x, ctx, None)
    }

    /// [`Linear::forward`]; with `rows`, `x` (B, 1, in) holds only those rows of a (B, T, in)
    /// input, and LoRA dropout draws for all B·T positions and keeps those rows' draws (the
    /// masks a whole pass would apply there).
    fn forward_rows(&self, x: &Tensor, ctx: &Ctx, rows: Option<&Rows>) -> Result<Tensor> {
        let pass = ctx.pass;
        let site = pass.lora.and_then(|l| {
            let (a, bm) = l.pair(self.layer, self.module)?;
            // Scoring builds no graph: the adapter's variables are read detached.
            Some(if pass.needs_grad() {
                (l, a.clone(), bm.clone())
            } else {
                (l, a.detach(), bm.detach())
            })
        });
        if ctx.fused {
            // One op: the projection, its LoRA path and that path's dropout, on (B, T, in) as
            // it comes (no reshape nodes: each costs a full-size gradient copy backwards).
            let lora = match site {
                Some((lora, a, bm)) => {
                    let p = lora.config.dropout;
                    let dropout = match rows {
                        None => ctx.dropout_mask(x.elem_count(), p)?,
                        Some(r) => {
                            let width = x.dim(D::Minus1)?;
                            ctx.dropout_mask(r.all() * width, p)?
                                .map(|m| m.rows(&r.flat, width))
                        }
                    };
                    Some((a, bm, lora.config.scaling(), dropout))
                }
                None => None,
            };
            let lora = lora.as_ref().map(|(a, b, scaling, dropout)| ops::LoraPath {
                a,
                b,
                scaling: *scaling,
                dropout: dropout.clone(),
            });
            return Ok(ops::linear(x, &self.w, self.b.as_ref(), lora)?);
        }
        let (b, t, fan_in) = x.dims3()?;
        let flat = x.reshape((b * t, fan_in))?;
        // LoRA: scaling · dropout(x) Aᵀ Bᵀ, scaled while it is r wide.
        let low = match site {
            Some((lora, a, bm)) => {
                let p = lora.config.dropout;
                let xin = match rows {
                    Some(r) if pass.train.is_some() && p > 0.0 => {
                        // The whole pass's mask, drawn over ones, at the chosen rows.
                        let ones = Tensor::ones((r.all(), fan_in), flat.dtype(), flat.device())?;
                        (&flat
                            * ctx
                                .dropout(&ones, p)?
                                .index_select(&r.index(x.device())?, 0)?)?
                    }
                    _ => ctx.dropout(&flat, p)?,
                };
                let low = (xin.to_dtype(a.dtype())?.matmul(&a.t()?)? * lora.config.scaling())?;
                Some((low, bm))
            }
            None => None,
        };
        let input_has_grad = pass.needs_grad() && flat.track_op();
        let mut y = if input_has_grad {
            flat.detach().matmul(&self.w.t()?)?
        } else {
            flat.matmul(&self.w.t()?)?
        };
        if let Some(bias) = &self.b {
            y = y.broadcast_add(bias)?;
        }
        if input_has_grad {
            y = flat.apply_op2(&y, FrozenWeight { w: self.w.clone() })?;
        }
        let y = match low {
            Some((low, bm)) => (y + low.matmul(&bm.t()?)?.to_dtype(x.dtype())?)?,
            None => y,
        };
        Ok(y.reshape((b, t, ()))?)
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(ws: &Weights, p: &str, c: &LlamaConfig, layer: usize) -> Result<Self> {
        let h = c.hidden_size;
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        let bias = c.attention_bias;
        let lin = |name: &str, io, bias, m| {
            Linear::load(ws, &format!("{p}.{name}"), io, bias, (layer, m))
        };
        Ok(Self {
            q: lin("q_proj", (h, q_out), bias, Module::Q)?,
            k: lin("k_proj", (h, kv_out), bias, Module::K)?,
            v: lin("v_proj", (h, kv_out), bias, Module::V)?,
            o: lin("o_proj", (q_out, h), false, Module::O)?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        })
    }

    /// The forward pass; with `keep`, also hands out this layer's keys (after RoPE) and
    /// values, each (B, T, kv_heads, hd), for a prefix cache.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        keep: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (q, k, v) = (
            self.q.forward(x, ctx)?,
            self.k.forward(x, ctx)?,
            self.v.forward(x, ctx)?,
        );
        let four = |x: &Tensor, n: usize| x.reshape((b, t, n, hd));
        let out = match &ctx.attn {
            Attn::Fused { mask, rope } => {
                // Heads side by side, RoPE inside the kernel: no reshape or transpose nodes.
                if let Some(keep) = keep {
                    keep.push((ops::rope(&four(&k, nkv)?, rope)?, four(&v, nkv)?));
                }
                ops::attention_flat(&q, &k, &v, (nh, nkv), mask, Some(rope))?
            }
            Attn::Composed { bias, cos, sin } => {
                let v = four(&v, nkv)?;
                let q = composed::rope(&four(&q, nh)?.contiguous()?, cos, sin)?;
                let k = composed::rope(&four(&k, nkv)?.contiguous()?, cos, sin)?;
                if let Some(keep) = keep {
                    keep.push((k.clone(), v.clone()));
                }
                composed::attention(&q, &k, &v, bias)?.reshape((b, t, nh * hd))?
            }
            Attn::Cached {
                rope,
                cache,
                groups,
            } => {
                let (q, k, v) = (four(&q, nh)?, four(&k, nkv)?, four(&v, nkv)?);
                let (q, k) = match rope {
                    CachedRope::Fused { tables, .. } => {
                        (ops::rope(&q, tables)?, ops::rope(&k, tables)?)
                    }
                    CachedRope::Composed { cos, sin, .. } => (
                        composed::rope(&q.contiguous()?, cos, sin)?,
                        composed::rope(&k.contiguous()?, cos, sin)?,
                    ),
                };
                let layer = self.q.layer;
                match rope {
                    CachedRope::Fused { mask, .. } => {
                        // One op over every run of rows: no narrow/cat nodes (each would cost
                        // a full-size gradient copy in a training pass).
                        let prefixes = groups
                            .iter()
                            .map(|&(p, n)| Ok((cache.layer(p, layer)?, n)))
                            .collect::<Result<Vec<_>>>()?;
                        let prefixes: Vec<(&Tensor, &Tensor, usize)> =
                            prefixes.iter().map(|&((k, v), n)| (k, v, n)).collect();
                        ops::prefix_attention(&q, &k, &v, mask, &prefixes)?.reshape((
                            b,
                            t,
                            nh * hd,
                        ))?
                    }
                    CachedRope::Composed { bias, .. } => {
                        let mut outs = Vec::with_capacity(groups.len());
                        let mut row = 0;
                        for &(p, n) in groups.iter() {
                            let (pk, pv) = cache.layer(p, layer)?;
                            let part = |x: &Tensor| x.narrow(0, row, n);
                            outs.push(composed::prefix_attention(
                                &part(&q)?,
                                &part(&k)?,
                                &part(&v)?,
                                &part(bias)?,
                                pk,
                                pv,
                            )?);
                            row += n;
                        }
                        Tensor::cat(&outs, 0)?.reshape((b, t, nh * hd))?
                    }
                }
            }
        };
        self.o.forward(&out, ctx)
    }

    /// The attention output (B, 1, hidden) at `rows` only: `x` (B, T, hidden) is the normed
    /// input at every position (keys and values need them all), `x_rows` the same at `rows`
    /// (B, 1, hidden); `bias` (B, 1, 1, T) masks each row's keys (padding, and causally
    /// after its position).
    fn forward_at(
        &self,
        x: &Tensor,
        x_rows: &Tensor,
        ctx: &Ctx,
        rows: &Rows,
        bias: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        // q first: LoRA dropout draws in the order of a whole pass.
        let q = self
            .q
            .forward_rows(x_rows, ctx, Some(rows))?
            .reshape((b, 1, nh, hd))?;
        let k = self.k.forward(x, ctx)?.reshape((b, t, nkv, hd))?;
        let v = self.v.forward(x, ctx)?.reshape((b, t, nkv, hd))?;
        let (q, k) = match &ctx.attn {
            Attn::Fused { rope, .. } => {
                (ops::rope(&q, &rope.rows(&rows.flat))?, ops::rope(&k, rope)?)
            }
            Attn::Composed { cos, sin, .. } => (
                composed::rope(&q, &rows.pick(cos)?, &rows.pick(sin)?)?,
                composed::rope(&k.contiguous()?, cos, sin)?,
            ),
            Attn::Cached { .. } => bail!("a suffix pass reads every position"),
        };
        let out = composed::attention_rows(&q, &k, &v, bias)?;
        self.o.forward_rows(&out, ctx, Some(rows))
    }
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(ws: &Weights, p: &str, c: &LlamaConfig, layer: usize) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let lin =
            |name: &str, io, m| Linear::load(ws, &format!("{p}.{name}"), io, false, (layer, m));
        Ok(Self {
            gate: lin("gate_proj", (h, i), Module::Gate)?,
            up: lin("up_proj", (h, i), Module::Up)?,
            down: lin("down_proj", (i, h), Module::Down)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx, rows: Option<&Rows>) -> Result<Tensor> {
        let parts = [&self.gate, &self.up, &self.down];
        let adapted = ctx
            .pass
            .lora
            .is_some_and(|l| parts.iter().any(|p| l.pair(p.layer, p.module).is_some()));
        if ctx.fused && !adapted && parts.iter().all(|p| p.b.is_none()) {
            // One op for the three projections and SwiGLU (no LoRA here: no dropout draws).
            return Ok(ops::mlp(x, &self.gate.w, &self.up.w, &self.down.w)?);
        }
        let gate = self.gate.forward_rows(x, ctx, rows)?;
        let up = self.up.forward_rows(x, ctx, rows)?;
        let act = if ctx.fused {
            ops::swiglu(&gate, &up)?
        } else {
            composed::swiglu(&gate, &up)?
        };
        self.down.forward_rows(&act, ctx, rows)
    }
}

struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

impl Block {
    fn load(ws: &Weights, c: &LlamaConfig, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        let h = c.hidden_size;
        Ok(Self {
            input_norm: ws.get(&format!("{p}.input_layernorm.weight"), &[h])?,
            attn: Attention::load(ws, &format!("{p}.self_attn"), c, layer)?,
            post_norm: ws.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            mlp: Mlp::load(ws, &format!("{p}.mlp"), c, layer)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        keep: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let x = (x + self
            .attn
            .forward(&ctx.rms_norm(x, &self.input_norm)?, ctx, keep)?)?;
        Ok((&x
            + self
                .mlp
                .forward(&ctx.rms_norm(&x, &self.post_norm)?, ctx, None)?)?)
    }

    /// The block's output (B, 1, hidden) at `rows` only (see [`Attention::forward_at`]).
    fn forward_at(&self, x: &Tensor, ctx: &Ctx, rows: &Rows, bias: &Tensor) -> Result<Tensor> {
        let normed = ctx.rms_norm(x, &self.input_norm)?;
        let a = self
            .attn
            .forward_at(&normed, &rows.pick(&normed)?, ctx, rows, bias)?;
        let x = (rows.pick(x)? + a)?;
        let m = self
            .mlp
            .forward(&ctx.rms_norm(&x, &self.post_norm)?, ctx, Some(rows))?;
        Ok((&x + m)?)
    }
}

/// One cached prompt prefix: its length and, per layer, its keys (kv_heads, hd, Tp) after
/// RoPE and its values (kv_heads, Tp, hd).
struct Prefix {
    len: usize,
    layers: Vec<(Tensor, Tensor)>,
}

/// Keys and values of prompt prefixes, made by [`Decoder::prefill`] and read by
/// [`Decoder::forward_cached`]: a user's instruction, history and `<UserID>` run once for all
/// of that user's candidates.
pub struct PrefixCache {
    prefixes: Vec<Prefix>,
}

impl PrefixCache {
    pub fn len(&self) -> usize {
        self.prefixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// Token count of prefix `p`.
    pub fn prefix_len(&self, p: usize) -> Option<usize> {
        self.prefixes.get(p).map(|x| x.len)
    }

    fn layer(&self, p: usize, layer: usize) -> Result<(&Tensor, &Tensor)> {
        let (k, v) = self
            .prefixes
            .get(p)
            .and_then(|x| x.layers.get(layer))
            .ok_or_else(|| anyhow::anyhow!("no cached prefix {p} at layer {layer}"))?;
        Ok((k, v))
    }
}

pub struct Decoder {
    pub config: LlamaConfig,
    embed: Tensor,
    lm_head: Tensor,
    norm: Tensor,
    blocks: Vec<Block>,
    inv_freq: Vec<f32>,
    /// Fused CPU kernels (the default on the CPU) or composed candle ops.
    fused: bool,
    pub dtype: DType,
    pub device: Device,
}

impl Decoder {
    pub fn new(config: &LlamaConfig, ws: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        if device.is_cpu() && !matches!(dtype, DType::F32 | DType::BF16) {
            bail!("the CPU engine computes in f32 or bf16, not {dtype:?} (f16 runs on CUDA only)");
        }
        let c = config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let embed = ws.get("model.embed_tokens.weight", &[v, h])?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            ws.get("lm_head.weight", &[v, h])?
        };
        let blocks = (0..c.num_hidden_layers)
            .map(|i| Block::load(ws, c, i))
            .collect::<Result<_>>()?;
        Ok(Self {
            config: c.clone(),
            embed,
            lm_head,
            norm: ws.get("model.norm.weight", &[h])?,
            blocks,
            inv_freq: c.inv_freq().into_iter().map(|x| x as f32).collect(),
            fused: device.is_cpu(),
            dtype,
            device: device.clone(),
        })
    }

    /// Chooses the fused CPU kernels (`true`, the CPU's default) or the composed candle ops
    /// (`false`, the only choice on other devices). For tests and benchmarks that compare them.
    pub fn set_fused(&mut self, fused: bool) -> Result<()> {
        if fused && !self.device.is_cpu() {
            bail!("the fused kernels run on the CPU only");
        }
        self.fused = fused;
        Ok(())
    }

    pub fn is_fused(&self) -> bool {
        self.fused
    }

    /// Keeps only the first `n` decoder layers (a speed knob for CPU experiments; the final
    /// norm and head then read layer n's output).
    pub fn truncate_layers(&mut self, n: usize) {
        if n < self.blocks.len() {
            self.blocks.truncate(n);
            self.config.num_hidden_layers = n;
        }
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Token embeddings of `ids`, shape (len, hidden).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let t = Tensor::from_vec(ids.to_vec(), ids.len(), &self.device)?;
        Ok(self.embed.index_select(&t, 0)?)
    }

    /// The embedding matrix (vocab, hidden).
    pub fn embedding_table(&self) -> &Tensor {
        &self.embed
    }

    /// Embeds token sequences of different lengths into a left-padded batch.
    pub fn embed_left_padded(&self, seqs: &[Vec<u32>], pad_id: u32) -> Result<(Tensor, Mask)> {
        let seq = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if seq == 0 {
            bail!("cannot embed an empty batch");
        }
        let mut ids = Vec::with_capacity(seqs.len() * seq);
        for s in seqs {
            ids.extend(std::iter::repeat_n(pad_id, seq - s.len()));
            ids.extend_from_slice(s);
        }
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let e = self
            .embed(&ids)?
            .reshape((seqs.len(), seq, self.hidden_size()))?;
        Ok((e, Mask::left_padded(&lens, seq)))
    }

    /// cos/sin tables (B, T, 1, hd) for the mask's position ids, offset by `offsets[b]` in
    /// row b.
    fn rope_tensors(&self, mask: &Mask, offsets: Option<&[usize]>) -> Result<(Tensor, Tensor)> {
        let (b, t) = (mask.batch, mask.seq);
        let positions = match offsets {
            Some(off) => mask.position_ids_after(off),
            None => mask.position_ids(),
        };
        let n = self.inv_freq.len();
        let inv = Tensor::from_vec(self.inv_freq.clone(), (1, 1, n), &self.device)?;
        let pos = Tensor::from_vec(positions, (b, t, 1), &self.device)?;
        let freqs = pos.broadcast_mul(&inv)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], 2)?.unsqueeze(2)?;
        Ok((
            freqs.cos()?.to_dtype(self.dtype)?,
            freqs.sin()?.to_dtype(self.dtype)?,
        ))
    }

    fn ctx<'a>(&self, mask: &Mask, pass: &'a Pass<'a>) -> Result<Ctx<'a>> {
        let attn = if self.fused {
            Attn::Fused {
                rope: RopeTables::new(&mask.position_ids(), &self.inv_freq),
                mask: mask.key_mask(),
            }
        } else {
            let (cos, sin) = self.rope_tensors(mask, None)?;
            Attn::Composed {
                cos,
                sin,
                bias: composed::attention_bias(&mask.key_mask(), self.dtype, &self.device)?,
            }
        };
        Ok(Ctx {
            pass,
            eps: self.config.rms_norm_eps,
            fused: self.fused,
            attn,
        })
    }

    /// Positions past the model's context are refused (RoPE would extrapolate silently).
    fn check_context(&self, tokens: usize) -> Result<()> {
        let max = self.config.max_position_embeddings;
        if max > 0 && tokens > max {
            bail!("a prompt of {tokens} tokens is longer than the model's context ({max} positions, max_position_embeddings)");
        }
        Ok(())
    }

    fn check_mask(&self, embeds: &Tensor, mask: &Mask) -> Result<()> {
        let (b, t, _) = embeds.dims3()?;
        if (mask.batch, mask.seq) != (b, t) {
            bail!(
                "mask is {}x{}, embeddings are {b}x{t}",
                mask.batch,
                mask.seq
            );
        }
        self.check_context(t)
    }

    /// Runs the decoder over input embeddings (B, T, hidden) and returns the hidden states
    /// (B, T, hidden) *before* the final norm. Hidden states at padding positions are
    /// unspecified (no real position reads them).
    pub fn forward(&self, embeds: &Tensor, mask: &Mask, pass: &Pass) -> Result<Tensor> {
        self.check_mask(embeds, mask)?;
        self.run_blocks(embeds, &self.ctx(mask, pass)?, None, &self.blocks)
    }

    /// The hidden states (B, 1, hidden) at one position per row, before the final norm:
    /// those of [`Decoder::forward`] there, with the last block computing only those rows
    /// (their queries, attention, projections and MLP; keys and values at every position).
    /// LoRA dropout draws what a whole pass draws. This is how scores and train steps read
    /// the last position: ~1/layers of the work saved.
    pub fn forward_at(
        &self,
        embeds: &Tensor,
        mask: &Mask,
        pass: &Pass,
        positions: &[usize],
    ) -> Result<Tensor> {
        self.check_mask(embeds, mask)?;
        let (b, t) = (mask.batch, mask.seq);
        if positions.len() != b || positions.iter().any(|&p| p >= t) {
            bail!("forward_at: positions {positions:?} for {b} rows of {t}");
        }
        let rows = Rows::new(t, positions);
        let ctx = self.ctx(mask, pass)?;
        let Some((last, rest)) = self.blocks.split_last() else {
            return rows.pick(&self.run_blocks(embeds, &ctx, None, &[])?);
        };
        let x = self.run_blocks(embeds, &ctx, None, rest)?;
        // Each row's real keys up to its position.
        let bias: Vec<f32> = (0..b * t)
            .map(|i| {
                let ok = mask.data[i] == 1 && i % t <= positions[i / t];
                if ok {
                    0.0
                } else {
                    -1e9
                }
            })
            .collect();
        let bias = Tensor::from_vec(bias, (b, 1, 1, t), &self.device)?.to_dtype(self.dtype)?;
        last.forward_at(&x, &ctx, &rows, &bias)
    }

    /// `blocks` over `embeds`; with `keep`, each layer's keys and values too.
    fn run_blocks(
        &self,
        embeds: &Tensor,
        ctx: &Ctx,
        mut keep: Option<&mut Vec<(Tensor, Tensor)>>,
        blocks: &[Block],
    ) -> Result<Tensor> {
        let mut x = embeds.to_dtype(self.dtype)?;
        if !ctx.pass.needs_grad() {
            // Scoring never builds a backward graph, even over injected (trainable) inputs.
            x = x.detach();
        }
        for block in blocks {
            x = block.forward(&x, ctx, keep.as_deref_mut())?;
        }
        Ok(x)
    }

    /// Runs prompt prefixes (P, Tp, hidden), padded as `mask` says, and keeps each one's keys
    /// and values per layer, padding dropped: the [`PrefixCache`] that
    /// [`Decoder::forward_cached`] reads. Inference only: the cache holds constants (no
    /// gradient reaches a prefix).
    pub fn prefill(&self, embeds: &Tensor, mask: &Mask, pass: &Pass) -> Result<PrefixCache> {
        if pass.needs_grad() {
            bail!("a prefix cache holds constants: run the prefix without gradients (a pass whose prefix trains runs whole prompts)");
        }
        self.check_mask(embeds, mask)?;
        let mut kv = Vec::with_capacity(self.blocks.len());
        self.run_blocks(embeds, &self.ctx(mask, pass)?, Some(&mut kv), &self.blocks)?;
        // Per prefix: its real positions (wherever the padding is), as (kv_heads, hd, Tp)
        // keys and (kv_heads, Tp, hd) values, the layouts the suffix attention multiplies.
        let mut prefixes = Vec::with_capacity(mask.batch);
        for p in 0..mask.batch {
            let real: Vec<u32> = (0..mask.seq)
                .filter(|&t| mask.data[p * mask.seq + t] == 1)
                .map(|t| t as u32)
                .collect();
            if real.is_empty() {
                bail!("prefix {p} is empty");
            }
            let len = real.len();
            let idx = Tensor::from_vec(real, len, &self.device)?;
            let layers = kv
                .iter()
                .map(|(k, v)| -> Result<(Tensor, Tensor)> {
                    let k = k.get(p)?.index_select(&idx, 0)?; // (Tp, nkv, hd)
                    let v = v.get(p)?.index_select(&idx, 0)?;
                    Ok((
                        k.permute((1, 2, 0))?.contiguous()?,
                        v.transpose(0, 1)?.contiguous()?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            prefixes.push(Prefix { len, layers });
        }
        Ok(PrefixCache { prefixes })
    }

    /// Runs prompt suffixes (B, Ts, hidden) that continue cached prefixes: the rows come in
    /// consecutive `groups` of (prefix index, row count); each row attends to all of its
    /// prefix and causally to its own real tokens, its positions continuing the prefix's.
    /// The hidden states equal those at the same positions of the whole prompts (within
    /// rounding).
    ///
    /// With `pass.grad` the suffixes build a backward graph (into their embeddings, and so
    /// into whatever made them) while the prefixes stay constants: the gradients equal the
    /// whole prompts' wherever nothing trained acts on the prefix (step 2 of CoLLM: the frozen
    /// LLM reading fixed text before the first ID slot). Such a pass draws no dropout
    /// (`pass.train` must be None), since the prefix ran without it.
    pub fn forward_cached(
        &self,
        embeds: &Tensor,
        mask: &Mask,
        cache: &PrefixCache,
        groups: &[(usize, usize)],
        pass: &Pass,
    ) -> Result<Tensor> {
        if pass.train.is_some() {
            bail!("a suffix over a cached prefix runs without dropout (the prefix ran without it): pass.train must be None");
        }
        self.check_mask(embeds, mask)?;
        let covered: usize = groups.iter().map(|g| g.1).sum();
        if covered != mask.batch {
            bail!(
                "prefix groups cover {covered} rows, the batch has {}",
                mask.batch
            );
        }
        let mut offsets = Vec::with_capacity(mask.batch);
        for &(p, n) in groups {
            let len = cache
                .prefix_len(p)
                .ok_or_else(|| anyhow::anyhow!("no cached prefix {p}"))?;
            offsets.extend(std::iter::repeat_n(len, n));
        }
        let longest = offsets
            .iter()
            .enumerate()
            .map(|(r, o)| {
                o + mask.data[r * mask.seq..(r + 1) * mask.seq]
                    .iter()
                    .filter(|&&m| m == 1)
                    .count()
            })
            .max()
            .unwrap_or(0);
        self.check_context(longest)?;
        let rope = if self.fused {
            CachedRope::Fused {
                tables: RopeTables::new(&mask.position_ids_after(&offsets), &self.inv_freq),
                mask: mask.key_mask(),
            }
        } else {
            let (cos, sin) = self.rope_tensors(mask, Some(&offsets))?;
            CachedRope::Composed {
                cos,
                sin,
                bias: composed::attention_bias(&mask.key_mask(), self.dtype, &self.device)?,
            }
        };
        let ctx = Ctx {
            pass,
            eps: self.config.rms_norm_eps,
            fused: self.fused,
            attn: Attn::Cached {
                rope,
                cache,
                groups,
            },
        };
        self.run_blocks(embeds, &ctx, None, &self.blocks)
    }

    /// Final-normed hidden states at one position per row, (B, hidden).
    pub fn hidden_at(&self, hidden: &Tensor, positions: &[usize], pass: &Pass) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let idx: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(r, &p)| (r * t + p) as u32)
            .collect();
        let rows = hidden
            .reshape((b * t, h))?
            .index_select(&Tensor::from_vec(idx, b, &self.device)?, 0)?;
        rms_norm(
            self.fused,
            pass.needs_grad(),
            &rows,
            &self.norm,
            self.config.rms_norm_eps,
        )
    }

    /// Logits of the chosen `token_ids` at each row's `positions`: (B, n). Never the whole
    /// vocabulary at every position.
    pub fn token_logits(
        &self,
        hidden: &Tensor,
        positions: &[usize],
        token_ids: &[u32],
        pass: &Pass,
    ) -> Result<Tensor> {
        let rows = self.hidden_at(hidden, positions, pass)?;
        let ids = Tensor::from_vec(token_ids.to_vec(), token_ids.len(), &self.device)?;
        let heads = self.lm_head.index_select(&ids, 0)?;
        Ok(rows.matmul(&heads.t()?)?.to_dtype(DType::F32)?)
    }

    /// Full-vocabulary logits at each row's `positions`: (B, vocab). For manual checks.
    pub fn vocab_logits(&self, hidden: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let rows = self.hidden_at(hidden, positions, &Pass::inference())?;
        Ok(rows.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)?)
    }
}
