//! Prompt prefixes run once and read by many suffixes: [`PrefixCache`], made by
//! [`Decoder::prefill`] and read by [`Decoder::forward_cached`].

use super::{Decoder, Mask, Pass};
use anyhow::{bail, Result};
use candle_core::Tensor;

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

    pub(super) fn layer(&self, p: usize, layer: usize) -> Result<(&Tensor, &Tensor)> {
        let (k, v) = self
            .prefixes
            .get(p)
            .and_then(|x| x.layers.get(layer))
            .ok_or_else(|| anyhow::anyhow!("no cached prefix {p} at layer {layer}"))?;
        Ok((k, v))
    }
}

impl Decoder {
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
        self.run_blocks(
            embeds,
            &self.ctx(mask, pass, None),
            Some(&mut kv),
            &self.blocks,
        )?;
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
        let mut ctx = self.ctx(mask, pass, Some(&offsets));
        ctx.cached = Some((cache, groups));
        self.run_blocks(embeds, &ctx, None, &self.blocks)
    }
}
