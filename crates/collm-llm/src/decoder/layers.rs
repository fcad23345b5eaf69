//! The decoder's layers, each with `load` and `forward`: `Linear` projections (LoRA by site),
//! `Attention`, `Mlp`, and the `Block` that holds them with its two RMSNorms.

use super::Ctx;
use crate::config::LlamaConfig;
use crate::load::Weights;
use crate::lora::Module;
use crate::ops::{self, KernelChoice, LoraSite, Rows, Weight};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// A frozen projection `y = x Wᵀ (+ b)`, adapted by the pass's LoRA pair for its site.
pub(super) struct Linear {
    /// Packed for the process's bf16 kernel where it multiplies this shape.
    w: Weight,
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
        (layer, module, kernel): (usize, Module, KernelChoice),
    ) -> Result<Self> {
        Ok(Self {
            w: Weight::new(
                &ws.get(&format!("{name}.weight"), &[fan_out, fan_in])?,
                kernel,
            )?,
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
            let (a, b) = if pass.needs_grad() {
                (a.clone(), bm.clone())
            } else {
                (a.detach(), bm.detach())
            };
            Some(LoraSite {
                a,
                b,
                scaling: l.config.scaling(),
                dropout: l.config.dropout,
            })
        });
        Ok(ops::linear(
            ctx.backend,
            x,
            (&self.w, self.b.as_ref()),
            site.as_ref(),
            ctx.info(),
            rows,
        )?)
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
    fn load(
        ws: &Weights,
        p: &str,
        c: &LlamaConfig,
        (layer, kernel): (usize, KernelChoice),
    ) -> Result<Self> {
        let h = c.hidden_size;
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        let bias = c.attention_bias;
        let lin = |name: &str, io, bias, m| {
            Linear::load(ws, &format!("{p}.{name}"), io, bias, (layer, m, kernel))
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
        let (q, k, v) = (
            self.q.forward(x, ctx)?,
            self.k.forward(x, ctx)?,
            self.v.forward(x, ctx)?,
        );
        let out = self.attend((&q, &k, &v), ctx, keep)?;
        self.o.forward(&out, ctx)
    }

    /// [`Attention::forward`] on `rows` of a padded batch: `x` (N, 1, hidden) holds them
    /// (see [`crate::Decoder::set_skip_padding`]); the projections run on those rows, attention
    /// on the padded layout (zeros at the other positions, which it masks out).
    fn forward_rows(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        rows: &Rows,
        keep: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let proj = |l: &Linear| -> Result<Tensor> {
            Ok(rows.place(&l.forward_rows(x, ctx, Some(rows))?)?)
        };
        let (q, k, v) = (proj(&self.q)?, proj(&self.k)?, proj(&self.v)?);
        let out = self.attend((&q, &k, &v), ctx, keep)?;
        self.o.forward_rows(&rows.pick(&out)?, ctx, Some(rows))
    }

    /// Attention of projected `q`, `k`, `v` (B, T, ·): (B, T, heads·hd).
    fn attend(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        ctx: &Ctx,
        keep: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        Ok(match ctx.cached {
            None => ops::attention(
                ctx.backend,
                (q, k, v),
                (nh, nkv),
                &ctx.pos,
                keep,
                ctx.kernel,
            )?,
            Some((cache, groups)) => {
                let four = |x: &Tensor, n: usize| x.reshape((b, t, n, hd));
                let layer = self.q.layer;
                let prefixes = groups
                    .iter()
                    .map(|&(p, n)| Ok((cache.layer(p, layer)?, n)))
                    .collect::<Result<Vec<_>>>()?;
                let prefixes: Vec<(&Tensor, &Tensor, usize)> =
                    prefixes.iter().map(|&((k, v), n)| (k, v, n)).collect();
                ops::prefix_attention(
                    ctx.backend,
                    (&four(q, nh)?, &four(k, nkv)?, &four(v, nkv)?),
                    &ctx.pos,
                    &prefixes,
                )?
                .reshape((b, t, nh * hd))?
            }
        })
    }

    /// The attention output (B, 1, hidden) at `rows` only: `x` (B, T, hidden) is the normed
    /// input at every position (keys and values need them all), `x_rows` the same at `rows`
    /// (B, 1, hidden); each row reads its real keys up to its position.
    fn forward_at(&self, x: &Tensor, x_rows: &Tensor, ctx: &Ctx, rows: &Rows) -> Result<Tensor> {
        if ctx.cached.is_some() {
            bail!("a suffix pass reads every position");
        }
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        // q first: LoRA dropout draws in the order of a whole pass.
        let q = self
            .q
            .forward_rows(x_rows, ctx, Some(rows))?
            .reshape((b, 1, nh, hd))?;
        let k = self.k.forward(x, ctx)?.reshape((b, t, nkv, hd))?;
        let v = self.v.forward(x, ctx)?.reshape((b, t, nkv, hd))?;
        let out = ops::attention_at(ctx.backend, (&q, &k, &v), &ctx.pos, rows)?;
        self.o.forward_rows(&out, ctx, Some(rows))
    }
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(
        ws: &Weights,
        p: &str,
        c: &LlamaConfig,
        (layer, kernel): (usize, KernelChoice),
    ) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let lin = |name: &str, io, m| {
            Linear::load(ws, &format!("{p}.{name}"), io, false, (layer, m, kernel))
        };
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
        if !adapted && parts.iter().all(|p| p.b.is_none()) {
            // The three projections and SwiGLU together (no LoRA here: no dropout draws).
            return Ok(ops::mlp(
                ctx.backend,
                x,
                (&self.gate.w, &self.up.w, &self.down.w),
                ctx.info(),
            )?);
        }
        let gate = self.gate.forward_rows(x, ctx, rows)?;
        let up = self.up.forward_rows(x, ctx, rows)?;
        let act = ops::swiglu(ctx.backend, &gate, &up)?;
        self.down.forward_rows(&act, ctx, rows)
    }
}

pub(super) struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

impl Block {
    pub(super) fn load(
        ws: &Weights,
        c: &LlamaConfig,
        layer: usize,
        kernel: KernelChoice,
    ) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        let h = c.hidden_size;
        Ok(Self {
            input_norm: ws.get(&format!("{p}.input_layernorm.weight"), &[h])?,
            attn: Attention::load(ws, &format!("{p}.self_attn"), c, (layer, kernel))?,
            post_norm: ws.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            mlp: Mlp::load(ws, &format!("{p}.mlp"), c, (layer, kernel))?,
        })
    }

    /// Its projections' weights.
    pub(super) fn weights(&self) -> [&Weight; 7] {
        let (a, m) = (&self.attn, &self.mlp);
        [
            &a.q.w, &a.k.w, &a.v.w, &a.o.w, &m.gate.w, &m.up.w, &m.down.w,
        ]
    }

    pub(super) fn forward(
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

    /// [`Block::forward`] on `rows` of a padded batch, held as (N, 1, hidden) (see
    /// [`crate::Decoder::set_skip_padding`]): LoRA dropout draws what a whole pass draws.
    pub(super) fn forward_rows(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        rows: &Rows,
        keep: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let x =
            (x + self
                .attn
                .forward_rows(&ctx.rms_norm(x, &self.input_norm)?, ctx, rows, keep)?)?;
        Ok((&x
            + self
                .mlp
                .forward(&ctx.rms_norm(&x, &self.post_norm)?, ctx, Some(rows))?)?)
    }

    /// The block's output (B, 1, hidden) at `rows` only (see [`Attention::forward_at`]).
    pub(super) fn forward_at(&self, x: &Tensor, ctx: &Ctx, rows: &Rows) -> Result<Tensor> {
        let normed = ctx.rms_norm(x, &self.input_norm)?;
        let a = self
            .attn
            .forward_at(&normed, &rows.pick(&normed)?, ctx, rows)?;
        let x = (rows.pick(x)? + a)?;
        let m = self
            .mlp
            .forward(&ctx.rms_norm(&x, &self.post_norm)?, ctx, Some(rows))?;
        Ok((&x + m)?)
    }
}
