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
//! The maths of each layer is in [`crate::ops`], which picks the implementation (the CPU
//! kernels, or the reference candle ops on other devices and in tests that compare the two):
//! nothing here branches on it.

mod layers;
mod prefix;

pub use crate::ops::Mask;
pub use prefix::PrefixCache;

use crate::config::LlamaConfig;
use crate::load::Weights;
use crate::lora::Lora;
use crate::ops::{self, Backend, Kernel, KernelChoice, PassInfo, Positions, Rows};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use collm_nn::TrainCtx;
use layers::Block;
use std::sync::Arc;

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

/// What every layer of one forward pass shares: the pass, the backend, and the positions
/// attention reads; in a suffix pass, the prefix cache and which rows continue which prefix.
struct Ctx<'a> {
    pass: &'a Pass<'a>,
    eps: f64,
    backend: Backend,
    pos: Positions,
    /// Suffixes attending to cached prefixes (see [`PrefixCache`]), in consecutive runs of
    /// (prefix index, row count); the prefixes are constants.
    cached: Option<(&'a PrefixCache, &'a [(usize, usize)])>,
    /// The decoder's projection kernel (attention's products follow it).
    kernel: Kernel,
    /// The batch's real positions where it has padding and the blocks skip it
    /// ([`Decoder::set_skip_padding`]): the residual stream, norms, projections and MLP run
    /// on these rows only, attention on the padded layout.
    real: Option<Rows>,
}

impl Ctx<'_> {
    fn info(&self) -> PassInfo<'_> {
        PassInfo {
            train: self.pass.train,
            grad: self.pass.needs_grad(),
        }
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(ops::rms_norm(
            self.backend,
            x,
            w,
            self.eps,
            self.pass.needs_grad(),
        )?)
    }
}

pub struct Decoder {
    pub config: LlamaConfig,
    embed: Tensor,
    lm_head: Tensor,
    norm: Tensor,
    blocks: Vec<Block>,
    inv_freq: Arc<Vec<f32>>,
    /// Which implementation the ops run (by device unless a test or benchmark chooses).
    backend: Backend,
    /// The kernel of its projections (the widest ones', see [`Decoder::kernel`]).
    kernel: Kernel,
    /// The CPU kernels' blocks run on a padded batch's real positions only (the default).
    skip_padding: bool,
    pub dtype: DType,
    pub device: Device,
}

impl Decoder {
    /// The decoder with the process's kernel for its projections ([`ops::kernel_choice`]:
    /// `COLLM_KERNEL`, else the fastest this CPU runs natively).
    pub fn new(config: &LlamaConfig, ws: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        let choice = if device.is_cpu() && dtype == DType::F32 {
            ops::kernel_choice().map_err(anyhow::Error::msg)?
        } else {
            KernelChoice::all(Kernel::F32)
        };
        Self::new_with_kernel(config, ws, dtype, device, choice)
    }

    /// The decoder with its projections multiplied by `kernel` (a bf16 kernel applies to f32
    /// CPU decoders only: the frozen projections packed in bf16, their f32 copies dropped).
    pub fn new_with_kernel(
        config: &LlamaConfig,
        ws: &Weights,
        dtype: DType,
        device: &Device,
        kernel: KernelChoice,
    ) -> Result<Self> {
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
        let blocks: Vec<Block> = (0..c.num_hidden_layers)
            .map(|i| Block::load(ws, c, i, kernel))
            .collect::<Result<_>>()?;
        let kernel = blocks
            .iter()
            .flat_map(|b| b.weights())
            .map(|w| w.kernel())
            .find(|k| k.is_bf16())
            .unwrap_or(Kernel::F32);
        Ok(Self {
            config: c.clone(),
            embed,
            lm_head,
            norm: ws.get("model.norm.weight", &[h])?,
            blocks,
            inv_freq: Arc::new(c.inv_freq().into_iter().map(|x| x as f32).collect()),
            backend: Backend::Auto,
            kernel,
            skip_padding: true,
            dtype,
            device: device.clone(),
        })
    }

    /// The kernel its projections are multiplied with (the widest ones', where `auto` leaves
    /// the narrow ones in f32): what logs and run records name.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Bytes the projections' weights take (packed or f32).
    pub fn projection_bytes(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(|b| b.weights())
            .map(|w| w.bytes())
            .sum()
    }

    /// Chooses the CPU kernels (`true`, the CPU's default) or the reference candle ops
    /// (`false`, the only choice on other devices). For tests and benchmarks that compare them.
    pub fn set_fused(&mut self, fused: bool) -> Result<()> {
        if fused && !self.device.is_cpu() {
            bail!("the fused kernels run on the CPU only");
        }
        self.backend = if fused {
            Backend::Cpu
        } else {
            Backend::Reference
        };
        Ok(())
    }

    /// With the CPU kernels, run the blocks on a padded batch's real positions only (`true`,
    /// the default: padding was 18% of the tokens of ML-1M's training batches of 16), or on
    /// every position as the composed ops do (`false`). The real positions' hidden states are
    /// the same either way: every op but attention acts on each position alone, and attention
    /// masks padding out. For tests and benchmarks that compare them.
    pub fn set_skip_padding(&mut self, skip: bool) {
        self.skip_padding = skip;
    }

    /// Does this decoder run the CPU kernels?
    pub fn is_fused(&self) -> bool {
        self.backend.kernels(&self.device)
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

    /// The context of a pass over `mask`'s batch; with `offsets`, row `b` continues a cached
    /// prefix of `offsets[b]` tokens (the caller then sets `cached`).
    fn ctx<'a>(&self, mask: &Mask, pass: &'a Pass<'a>, offsets: Option<&[usize]>) -> Ctx<'a> {
        Ctx {
            pass,
            eps: self.config.rms_norm_eps,
            backend: self.backend,
            pos: Positions::new(
                mask,
                offsets,
                self.inv_freq.clone(),
                self.dtype,
                &self.device,
            ),
            cached: None,
            kernel: self.kernel,
            // A batch with padding and some real position (one of padding only keeps the
            // padded layout: no empty products).
            real: (self.skip_padding
                && self.backend.kernels(&self.device)
                && mask.data.contains(&0)
                && mask.data.contains(&1))
            .then(|| Rows::real(mask)),
        }
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
        self.run_blocks(embeds, &self.ctx(mask, pass, None), None, &self.blocks)
    }

    /// The mean over each row's real tokens of the last hidden state (after the final norm, as
    /// transformers' `last_hidden_state`), (B, hidden), as inference: a frozen semantic
    /// encoding of each text (CTRL's).
    pub fn mean_pooled(&self, embeds: &Tensor, mask: &Mask) -> Result<Tensor> {
        let pass = Pass::inference();
        let h = self.forward(embeds, mask, &pass)?;
        let normed = ops::rms_norm(
            self.backend,
            &h,
            &self.norm,
            self.config.rms_norm_eps,
            false,
        )?;
        let (b, t) = (mask.batch, mask.seq);
        let m: Vec<f32> = mask.data.iter().map(|&x| x as f32).collect();
        let m = Tensor::from_vec(m, (b, t, 1), &self.device)?.to_dtype(normed.dtype())?;
        let sum = normed.broadcast_mul(&m)?.sum(1)?;
        let count = m.sum(1)?.clamp(1.0, f64::MAX)?;
        Ok(sum.broadcast_div(&count)?.to_dtype(DType::F32)?)
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
        let ctx = self.ctx(mask, pass, None);
        let Some((last, rest)) = self.blocks.split_last() else {
            return Ok(rows.pick(&self.run_blocks(embeds, &ctx, None, &[])?)?);
        };
        let x = self.run_blocks(embeds, &ctx, None, rest)?;
        last.forward_at(&x, &ctx, &rows)
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
        if let Some(real) = &ctx.real {
            if !blocks.is_empty() {
                let mut x = real.pick(&x)?;
                for block in blocks {
                    x = block.forward_rows(&x, ctx, real, keep.as_deref_mut())?;
                }
                return Ok(real.place(&x)?);
            }
        }
        for block in blocks {
            x = block.forward(&x, ctx, keep.as_deref_mut())?;
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
            .index_select(&Tensor::from_vec(idx, b, &self.device)?, 0)?;
        Ok(ops::rms_norm(
            self.backend,
            &rows,
            &self.norm,
            self.config.rms_norm_eps,
            pass.needs_grad(),
        )?)
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
