//! SASRec (pmixer-style, as the reference uses it): item embeddings scaled by √d plus learned
//! positions over the left-padded last L history items; blocks of
//! `Q = LN(x); x = Q + MHA(Q, x, x)` with a causal mask, then `LN` and a point-wise FFN with an
//! inner residual; padded steps zeroed after each block; a final LN. u = the last position's
//! output, i = the target's item embedding, score = ⟨u, i⟩.

use crate::nn::{dropout, LayerNorm, Linear};
use crate::params::{Init, ParamStore};
use crate::{CfBatch, CfConfig, CfOutput, CollaborativeModel, ModelKind, TrainCtx};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

struct Block {
    attn_norm: LayerNorm,
    in_proj: Linear,
    out_proj: Linear,
    ffn_norm: LayerNorm,
    conv1: Linear,
    conv2: Linear,
}

pub struct SasRec {
    ps: ParamStore,
    items: Tensor,
    positions: Tensor,
    blocks: Vec<Block>,
    last_norm: LayerNorm,
    causal: Tensor,
    dim: usize,
    heads: usize,
    max_len: usize,
    dropout: f64,
}

impl SasRec {
    pub fn new(cfg: &CfConfig, num_items: usize, dev: &Device) -> Result<Self> {
        let mut ps = ParamStore::new(dev, cfg.seed);
        let d = cfg.dim;
        // Initialised as the reference's SASRec (rec_base_models.py) leaves it, PyTorch's
        // defaults: embeddings N(0, 1) (the padding row 0 zero), nn.MultiheadAttention's
        // in_proj Xavier-uniform with zero bias, its out_proj U(±1/√d) with zero bias, and the
        // 1×1 convolutions U(±1/√d) for weight and bias. The N(0, 1) embeddings matter: the
        // logits start large and weight decay shrinks them over many epochs.
        let items = ps.param(
            "item_emb.weight",
            &[num_items, d],
            Init::Normal { std: 1.0 },
        )?;
        {
            // The padding row is zero, as nn.Embedding(padding_idx=0) makes it. (It is masked
            // out of every sequence, so it gets no gradient and stays zero.)
            let var = ps.get("item_emb.weight").expect("just created");
            let mut keep = vec![1f32; num_items];
            keep[0] = 0.0;
            let keep = Tensor::from_vec(keep, (num_items, 1), dev)?;
            var.set(&items.broadcast_mul(&keep)?)?;
        }
        let positions = ps.param(
            "pos_emb.weight",
            &[cfg.max_len, d],
            Init::Normal { std: 1.0 },
        )?;
        let default_bound = Init::Uniform {
            bound: 1.0 / (d as f64).sqrt(),
        };
        let xavier_uniform = Init::Uniform {
            bound: (6.0 / (d + 3 * d) as f64).sqrt(),
        };
        let mut blocks = Vec::new();
        for b in 0..cfg.blocks {
            let attn = format!("attention_layers.{b}");
            let ffn = format!("forward_layers.{b}");
            blocks.push(Block {
                attn_norm: LayerNorm::new(&mut ps, &format!("attention_layernorms.{b}"), d, 1e-8)?,
                in_proj: Linear::with_init(
                    &mut ps,
                    &format!("{attn}.in_proj"),
                    d,
                    3 * d,
                    xavier_uniform,
                    Init::Zeros,
                )?,
                out_proj: Linear::with_init(
                    &mut ps,
                    &format!("{attn}.out_proj"),
                    d,
                    d,
                    default_bound,
                    Init::Zeros,
                )?,
                ffn_norm: LayerNorm::new(&mut ps, &format!("forward_layernorms.{b}"), d, 1e-8)?,
                conv1: Linear::new(&mut ps, &format!("{ffn}.conv1"), d, d)?,
                conv2: Linear::new(&mut ps, &format!("{ffn}.conv2"), d, d)?,
            });
        }
        let last_norm = LayerNorm::new(&mut ps, "last_layernorm", d, 1e-8)?;
        // Additive causal mask: position t attends to 0..=t.
        let l = cfg.max_len;
        let mask: Vec<f32> = (0..l * l)
            .map(|k| if k % l > k / l { -1e9 } else { 0.0 })
            .collect();
        Ok(Self {
            ps,
            items,
            positions,
            blocks,
            last_norm,
            causal: Tensor::from_vec(mask, (l, l), dev)?,
            dim: d,
            heads: cfg.heads,
            max_len: cfg.max_len,
            dropout: cfg.dropout,
        })
    }

    fn attention(
        &self,
        blk: &Block,
        q_in: &Tensor,
        kv_in: &Tensor,
        ctx: Option<&TrainCtx>,
    ) -> Result<Tensor> {
        let (b, l, d) = q_in.dims3()?;
        let h = self.heads;
        let hd = d / h;
        let w = &blk.in_proj.weight;
        let bias = blk.in_proj.bias.as_ref().expect("in_proj has a bias");
        let proj = |x: &Tensor, k: usize| -> Result<Tensor> {
            let wk = w.narrow(0, k * d, d)?;
            let bk = bias.narrow(0, k * d, d)?;
            let y = x
                .reshape((b * l, d))?
                .matmul(&wk.t()?)?
                .broadcast_add(&bk)?;
            Ok(y.reshape((b, l, h, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = proj(q_in, 0)?;
        let k = proj(kv_in, 1)?;
        let v = proj(kv_in, 2)?;
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (hd as f64).sqrt())?
            .broadcast_add(&self.causal)?;
        let att = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let att = dropout(&att, self.dropout, ctx)?;
        let out = att.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?;
        blk.out_proj.forward(&out)
    }

    /// The sequence encoding at the last position, (B, d).
    pub fn encode(&self, history: &Tensor, ctx: Option<&TrainCtx>) -> Result<Tensor> {
        let (b, l) = history.dims2()?;
        let keep = history.ne(0u32)?.to_dtype(DType::F32)?.unsqueeze(2)?;
        let mut x = (self
            .items
            .index_select(&history.flatten_all()?, 0)?
            .reshape((b, l, self.dim))?
            * (self.dim as f64).sqrt())?;
        x = x.broadcast_add(&self.positions.unsqueeze(0)?)?;
        x = dropout(&x, self.dropout, ctx)?;
        x = x.broadcast_mul(&keep)?;
        for blk in &self.blocks {
            let q = blk.attn_norm.forward(&x)?;
            x = (&q + self.attention(blk, &q, &x, ctx)?)?;
            x = blk.ffn_norm.forward(&x)?;
            let mut f = blk.conv1.forward(&x)?;
            f = dropout(&f, self.dropout, ctx)?.relu()?;
            f = dropout(&blk.conv2.forward(&f)?, self.dropout, ctx)?;
            x = (f + &x)?.broadcast_mul(&keep)?;
        }
        let out = self.last_norm.forward(&x)?;
        Ok(out.narrow(1, l - 1, 1)?.squeeze(1)?)
    }
}

impl CollaborativeModel for SasRec {
    fn kind(&self) -> ModelKind {
        ModelKind::SasRec
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn history_len(&self) -> usize {
        self.max_len
    }
    fn forward(&self, b: &CfBatch, ctx: Option<&TrainCtx>) -> Result<CfOutput> {
        let u = self.encode(&b.history, ctx)?;
        let i = self.items.index_select(&b.items, 0)?;
        Ok(CfOutput {
            score: u.mul(&i)?.sum(D::Minus1)?,
            user: u,
            item: i,
        })
    }
    fn params(&self) -> &ParamStore {
        &self.ps
    }
}
