//! The LLaMA-family decoder, with what CoLLM needs and ready-made model files lack:
//! - a forward pass from **input embeddings** (so ID slots can hold mapped collaborative
//!   vectors), for batches of different lengths with a per-row attention mask — left or right
//!   padding; position ids follow the mask; masking uses a large finite negative so that no
//!   row is ever all `-inf` (a known NaN source);
//! - scoring that computes logits only for chosen token ids at each row's last real position;
//! - LoRA on any projection;
//! - only differentiable ops on the training path (RMSNorm, RoPE and softmax written with plain
//!   tensor ops; candle's fused versions are used only when no gradient is needed).

use crate::config::LlamaConfig;
use crate::load::Weights;
use crate::lora::Lora;
use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, Shape, Tensor, D};
use collm_nn::layers::dropout;
use collm_nn::TrainCtx;

/// A frozen projection `y = x Wᵀ (+ b)`.
struct Proj {
    w: Tensor,
    b: Option<Tensor>,
}

impl Proj {
    fn new(ws: &Weights, name: &str, fan_in: usize, fan_out: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            w: ws.get(&format!("{name}.weight"), &[fan_out, fan_in])?,
            b: if bias {
                Some(ws.get(&format!("{name}.bias"), &[fan_out])?)
            } else {
                None
            },
        })
    }
}

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

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    gate: Proj,
    up: Proj,
    down: Proj,
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
}

pub struct Decoder {
    pub config: LlamaConfig,
    embed: Tensor,
    lm_head: Tensor,
    norm: Tensor,
    layers: Vec<Layer>,
    inv_freq: Tensor,
    pub dtype: DType,
    pub device: Device,
}

/// Mask value: large and finite, so that a fully masked row stays finite.
const MASKED: f32 = -1e9;

impl Decoder {
    pub fn new(config: &LlamaConfig, ws: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        let c = config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        let embed = ws.get("model.embed_tokens.weight", &[v, h])?;
        let lm_head = if ws.has("lm_head.weight") && !c.tie_word_embeddings {
            ws.get("lm_head.weight", &[v, h])?
        } else if c.tie_word_embeddings {
            embed.clone()
        } else {
            ws.get("lm_head.weight", &[v, h])?
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = c.attention_bias;
            layers.push(Layer {
                input_norm: ws.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: ws.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q: Proj::new(ws, &format!("{p}.self_attn.q_proj"), h, q_out, bias)?,
                k: Proj::new(ws, &format!("{p}.self_attn.k_proj"), h, kv_out, bias)?,
                v: Proj::new(ws, &format!("{p}.self_attn.v_proj"), h, kv_out, bias)?,
                o: Proj::new(ws, &format!("{p}.self_attn.o_proj"), q_out, h, false)?,
                gate: Proj::new(
                    ws,
                    &format!("{p}.mlp.gate_proj"),
                    h,
                    c.intermediate_size,
                    false,
                )?,
                up: Proj::new(
                    ws,
                    &format!("{p}.mlp.up_proj"),
                    h,
                    c.intermediate_size,
                    false,
                )?,
                down: Proj::new(
                    ws,
                    &format!("{p}.mlp.down_proj"),
                    c.intermediate_size,
                    h,
                    false,
                )?,
            });
        }
        let inv: Vec<f32> = c.inv_freq().into_iter().map(|x| x as f32).collect();
        let n = inv.len();
        Ok(Self {
            config: c.clone(),
            embed,
            lm_head,
            norm: ws.get("model.norm.weight", &[h])?,
            layers,
            inv_freq: Tensor::from_vec(inv, (1, 1, n), device)?,
            dtype,
            device: device.clone(),
        })
    }

    /// Keeps only the first `n` decoder layers (a speed knob for CPU experiments; the final
    /// norm and head then read layer n's output).
    pub fn truncate_layers(&mut self, n: usize) {
        if n < self.layers.len() {
            self.layers.truncate(n);
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

    fn rms_norm(&self, x: &Tensor, w: &Tensor, pass: &Pass) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        if !pass.needs_grad() && x.dtype() == DType::F32 {
            return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?);
        }
        // As transformers: normalise in f32, scale in the compute dtype.
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf
            .broadcast_div(&(ms + eps)?.sqrt()?)?
            .to_dtype(x.dtype())?;
        Ok(y.broadcast_mul(w)?)
    }

    fn project(
        &self,
        x: &Tensor,
        p: &Proj,
        layer: usize,
        module: &str,
        pass: &Pass,
    ) -> Result<Tensor> {
        let (b, t, fan_in) = x.dims3()?;
        let flat = x.reshape((b * t, fan_in))?;
        let input_has_grad = pass.needs_grad() && flat.track_op();
        let mut y = if input_has_grad {
            flat.detach().matmul(&p.w.t()?)?
        } else {
            flat.matmul(&p.w.t()?)?
        };
        if let Some(bias) = &p.b {
            y = y.broadcast_add(bias)?;
        }
        if input_has_grad {
            y = flat.apply_op2(&y, FrozenWeight { w: p.w.clone() })?;
        }
        if let Some(lora) = pass.lora {
            if let Some((a, bm)) = lora.get(layer, module) {
                let xin = dropout(&flat, lora.config.dropout, pass.train)?;
                let delta = xin.to_dtype(a.dtype())?.matmul(&a.t()?)?.matmul(&bm.t()?)?;
                let dt = y.dtype();
                y = (y + (delta * lora.config.scaling())?.to_dtype(dt)?)?;
            }
        }
        Ok(y.reshape((b, t, ()))?)
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
    }

    /// Runs the decoder over input embeddings (B, T, hidden) and returns the hidden states
    /// (B, T, hidden) *before* the final norm.
    pub fn forward(&self, embeds: &Tensor, mask: &Mask, pass: &Pass) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = embeds.dims3()?;
        if (mask.batch, mask.seq) != (b, t) {
            bail!(
                "mask is {}x{}, embeddings are {b}x{t}",
                mask.batch,
                mask.seq
            );
        }
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        // RoPE tables for the mask's position ids: (B, 1, T, hd).
        let pos = Tensor::from_vec(mask.position_ids(), (b, t, 1), &self.device)?;
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        let cos = freqs.cos()?.to_dtype(self.dtype)?;
        let sin = freqs.sin()?.to_dtype(self.dtype)?;
        // Additive attention bias (B, 1, T, T): causal and key padding, finite.
        let mut bias = vec![0f32; b * t * t];
        for r in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if j > i || mask.data[r * t + j] == 0 {
                        bias[(r * t + i) * t + j] = MASKED;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, t, t), &self.device)?.to_dtype(self.dtype)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = embeds.to_dtype(self.dtype)?;
        for (li, l) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &l.input_norm, pass)?;
            let q = self
                .project(&h, &l.q, li, "q_proj", pass)?
                .reshape((b, t, nh, hd))?
                .transpose(1, 2)?;
            let k = self
                .project(&h, &l.k, li, "k_proj", pass)?
                .reshape((b, t, nkv, hd))?
                .transpose(1, 2)?;
            let v = self
                .project(&h, &l.v, li, "v_proj", pass)?
                .reshape((b, t, nkv, hd))?
                .transpose(1, 2)?;
            let q = self.rope(&q.contiguous()?, &cos, &sin)?;
            let k = self.rope(&k.contiguous()?, &cos, &sin)?;
            let (k, v) = if nh != nkv {
                let rep = nh / nkv;
                let expand = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.unsqueeze(2)?
                        .broadcast_as((b, nkv, rep, t, hd))?
                        .reshape((b, nh, t, hd))?)
                };
                (expand(&k)?, expand(&v.contiguous()?)?)
            } else {
                (k, v.contiguous()?)
            };
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            let att = if pass.needs_grad() {
                candle_nn::ops::softmax(&scores, D::Minus1)?
            } else {
                candle_nn::ops::softmax_last_dim(&scores)?
            };
            let out = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
            x = (x + self.project(&out, &l.o, li, "o_proj", pass)?)?;
            let h = self.rms_norm(&x, &l.post_norm, pass)?;
            let gate = self.project(&h, &l.gate, li, "gate_proj", pass)?;
            let up = self.project(&h, &l.up, li, "up_proj", pass)?;
            let act = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + self.project(&act, &l.down, li, "down_proj", pass)?)?;
            if !pass.needs_grad() {
                // LoRA tensors are variables, so candle records the graph even here; cutting
                // it frees each layer's activations as soon as the next one is computed.
                x = x.detach();
            }
        }
        Ok(x)
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
            .index_select(&Tensor::from_vec(idx, b, &self.device)?, 0)?
            .unsqueeze(1)?;
        Ok(self.rms_norm(&rows, &self.norm, pass)?.squeeze(1)?)
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
