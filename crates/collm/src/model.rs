//! CoLLM assembled (paper Figure 2): prompt construction → hybrid encoding → LLM prediction.
//! A batch of interactions becomes left-padded token embeddings in which the ID-slot rows are
//! replaced by the slot source's vectors (and only those rows), then one decoder pass gives the
//! " Yes" logit at each row's last position: the click score, P(Yes) = sigmoid(score).

use crate::cie::{Mapper, SlotSource};
use crate::experiment::{ExperimentConfig, Mode};
use crate::prompt::{Encoded, PromptBuilder, Template};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use collm_cf::{CfBatch, CollaborativeModel};
use collm_data::{Dataset, Interaction};
use collm_llm::{Backbone, Lora, Mask, Pass};
use collm_nn::{ParamStore, TrainCtx};
use std::collections::HashMap;

pub struct CoLlm {
    pub config: ExperimentConfig,
    pub backbone: Backbone,
    pub lora: Option<Lora>,
    pub slots: SlotSource,
    pub prompt: PromptBuilder,
    yes_id: u32,
    no_id: u32,
    pad_id: u32,
    placeholder_id: u32,
    cf_history: usize,
    /// Subtracted from every score (`calibrate`; see the config field). 0 until training sets it.
    pub score_offset: f64,
    /// Training passes run each prompt's frozen prefix as inference where the mode allows
    /// ([`CoLlm::frozen_prefix_ends`]); on by default, off only to measure the whole-prompt
    /// path (`collm bench train`).
    pub frozen_prefix: bool,
}

impl CoLlm {
    /// The model a config describes, from its parts: the backbone, the step-1 LoRA (modes that
    /// need one: frozen here) and the collaborative model (CIE modes: trained along in `t1`
    /// and `t2`). A fresh LoRA (modes that train one), mapper, soft prompt or UI tokens are
    /// drawn from the config's seed. Touches no file: `collm::run::build_model` loads the
    /// parts a config names.
    pub fn new(
        cfg: &ExperimentConfig,
        ds: &Dataset,
        mut backbone: Backbone,
        step1: Option<Lora>,
        cf: Option<Box<dyn CollaborativeModel>>,
    ) -> Result<Self> {
        cfg.validate()?;
        let device = backbone.decoder.device.clone();
        let device = &device;
        if let Some(n) = cfg.model.max_layers {
            backbone.decoder.truncate_layers(n);
        }
        let dec = &backbone.decoder;
        let tok = &backbone.tokenizer;
        let yes_id = tok
            .single_token(&cfg.model.answer_yes)
            .context("answer_yes must be one token")?;
        let no_id = tok
            .single_token(&cfg.model.answer_no)
            .context("answer_no must be one token")?;
        let pad_id = tok.pad_id.or(tok.eos_id).unwrap_or(0);
        let placeholder_id = tok.unk_id.unwrap_or(0);
        let lora = if cfg.mode.trains_lora() {
            Some(Lora::new(&cfg.model.lora, &dec.config, cfg.seed, device)?)
        } else if cfg.mode.needs_step1() {
            let mut l = step1.context("this mode needs the step-1 LoRA")?;
            l.freeze();
            Some(l)
        } else {
            None
        };
        let d2 = dec.hidden_size();
        let k = cfg.k();
        let mut cf_history = 0;
        let slots = match cfg.mode {
            Mode::Icl | Mode::Tallrec => SlotSource::None,
            Mode::Softprompt => SlotSource::soft_prompt(k, d2, cfg.seed, device)?,
            Mode::Uitoken => {
                SlotSource::ui_token(ds.num_users(), ds.num_items(), d2, cfg.seed, device)?
            }
            Mode::Collm | Mode::T1 | Mode::T2 | Mode::T3 => {
                let cf = cf.context("this mode needs a collaborative model")?;
                cf_history = cf.history_len();
                let mapper = Mapper::new(cf.dim(), cfg.model.mapper_mult, d2, k, cfg.seed, device)?;
                SlotSource::Cie {
                    cf,
                    cf_trainable: matches!(cfg.mode, Mode::T1 | Mode::T2),
                    mapper,
                }
            }
        };
        let template = Template::resolve(&cfg.template_name())?;
        if template.has_id_slots() && matches!(slots, SlotSource::None) {
            bail!(
                "template '{}' has ID slots, but mode '{}' has nothing to fill them with",
                template.name,
                cfg.mode.name()
            );
        }
        if !template.has_id_slots() && !matches!(slots, SlotSource::None) {
            bail!(
                "mode '{}' needs a template with <UserID>/<TargetItemID> slots; '{}' has none",
                cfg.mode.name(),
                template.name
            );
        }
        let mut prompt = PromptBuilder::new(template, &ds.manifest.item_noun);
        prompt.history = cfg.model.history;
        prompt.tokens_per_slot = k;
        Ok(Self {
            config: cfg.clone(),
            backbone,
            lora,
            slots,
            prompt,
            yes_id,
            no_id,
            pad_id,
            placeholder_id,
            cf_history,
            score_offset: 0.0,
            frozen_prefix: true,
        })
    }

    /// Trainable parameter stores of this mode, by group.
    pub fn trainable_stores(&self) -> Vec<(&'static str, &ParamStore)> {
        let mut v = Vec::new();
        if self.config.mode.trains_lora() {
            if let Some(l) = &self.lora {
                v.push(("lora", &l.params));
            }
        }
        v.extend(self.slots.stores());
        v
    }

    pub fn encode_prompts(&self, rows: &[&Interaction], titles: &[String]) -> Result<Vec<Encoded>> {
        rows.iter()
            .map(|r| {
                self.prompt
                    .encode(&self.backbone.tokenizer, r, titles, self.placeholder_id)
            })
            .collect()
    }

    /// Input embeddings of a batch, with the ID slots filled: (B, T, d2) and the mask.
    pub fn embed_batch(
        &self,
        rows: &[&Interaction],
        titles: &[String],
        ctx: Option<&TrainCtx>,
    ) -> Result<(Tensor, Mask)> {
        let enc = self.encode_prompts(rows, titles)?;
        let slots = self.slot_values(rows, ctx)?;
        self.embed_encoded(&enc, slots.as_ref())
    }

    /// The user and item slot vectors of `rows`, (B, k, d2) each; None for text-only modes.
    pub(crate) fn slot_values(
        &self,
        rows: &[&Interaction],
        ctx: Option<&TrainCtx>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let dec = &self.backbone.decoder;
        let cfb = CfBatch::new(rows, self.cf_history, &dec.device)?;
        self.slots
            .encode(&cfb, self.config.k(), dec.hidden_size(), ctx)
    }

    /// Left-padded embeddings of encoded prompts (or prompt parts) with their ID slots filled
    /// from `slots` (row r of each tensor fills prompt r's user / item slots).
    pub(crate) fn embed_encoded(
        &self,
        enc: &[Encoded],
        slots: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, Mask)> {
        let dec = &self.backbone.decoder;
        let seqs: Vec<Vec<u32>> = enc.iter().map(|e| e.ids.clone()).collect();
        let (emb, mask) = dec.embed_left_padded(&seqs, self.pad_id)?;
        let dev = &dec.device;
        let k = self.config.k();
        let Some((u, i)) = slots else {
            return Ok((emb, mask));
        };
        let (b, t, h) = emb.dims3()?;
        // Rows of the flattened (B·T, d2) embeddings to replace, in the order of `values`:
        // per prompt, its user slots then its item slots.
        let mut index = Vec::new();
        let mut parts = Vec::new();
        for (r, e) in enc.iter().enumerate() {
            let offset = t - e.ids.len();
            for &p in &e.user_slots {
                index.push((r * t + offset + p) as u32);
            }
            for &p in &e.item_slots {
                index.push((r * t + offset + p) as u32);
            }
            if !e.user_slots.is_empty() {
                parts.push(u.get(r)?.narrow(0, 0, e.user_slots.len().min(k))?);
            }
            if !e.item_slots.is_empty() {
                parts.push(i.get(r)?.narrow(0, 0, e.item_slots.len().min(k))?);
            }
        }
        if index.is_empty() {
            return Ok((emb, mask));
        }
        let values = Tensor::cat(&parts, 0)?.to_dtype(emb.dtype())?;
        if values.dim(0)? != index.len() {
            bail!("a prompt repeats an ID slot: fill each slot once");
        }
        let mut keep = vec![1f32; b * t];
        for &ix in &index {
            keep[ix as usize] = 0.0;
        }
        let keep = Tensor::from_vec(keep, (b * t, 1), dev)?.to_dtype(emb.dtype())?;
        let idx = Tensor::from_vec(index, values.dim(0)?, dev)?;
        let flat = emb.reshape((b * t, h))?;
        let injected = flat.zeros_like()?.index_add(&idx, &values, 0)?;
        let out = (flat.broadcast_mul(&keep)? + injected)?.reshape((b, t, h))?;
        Ok((out, mask))
    }

    /// The pass that scoring runs: this model's LoRA, no dropout, no graph.
    pub(crate) fn scoring_pass(&self) -> Pass<'_> {
        Pass {
            lora: self.lora.as_ref(),
            train: None,
            grad: false,
        }
    }

    /// The click score from the decoder's hidden states: the " Yes" logit at each row's
    /// `positions` (its last: see [`Decoder::forward_at`]) (or Yes − No), minus
    /// `score_offset`. Shape (B,).
    pub(crate) fn score_hidden(
        &self,
        h: &Tensor,
        positions: &[usize],
        pass: &Pass,
    ) -> Result<Tensor> {
        let dec = &self.backbone.decoder;
        let logits = dec.token_logits(h, positions, &[self.yes_id, self.no_id], pass)?;
        let yes = logits.narrow(1, 0, 1)?.squeeze(1)?;
        let raw = if self.config.model.score == crate::experiment::Score::YesMinusNo {
            (yes - logits.narrow(1, 1, 1)?.squeeze(1)?)?
        } else {
            yes
        };
        Ok(if self.score_offset != 0.0 {
            (raw - self.score_offset)?
        } else {
            raw
        })
    }

    /// Click scores (logits) of a batch: the " Yes" logit at the last prompt position (or
    /// Yes − No with `score = "yes_minus_no"`), minus `score_offset`. Shape (B,).
    ///
    /// With `grad`, where nothing trained acts before the first ID slot (see
    /// [`CoLlm::frozen_prefix_ends`]), the text before it runs as inference into a prefix
    /// cache and only the rest builds a graph: the same scores and gradients, without the
    /// backward pass over the frozen LLM reading fixed text.
    pub fn scores(
        &self,
        rows: &[&Interaction],
        titles: &[String],
        ctx: Option<&TrainCtx>,
        grad: bool,
    ) -> Result<Tensor> {
        let enc = self.encode_prompts(rows, titles)?;
        let slots = self.slot_values(rows, ctx)?;
        if grad {
            if let Some(ends) = self.frozen_prefix_ends(&enc) {
                return self.scores_after_frozen_prefix(&enc, &ends, slots.as_ref());
            }
        }
        let (emb, mask) = self.embed_encoded(&enc, slots.as_ref())?;
        let pass = Pass {
            lora: self.lora.as_ref(),
            train: if self.config.mode.trains_lora() {
                ctx
            } else {
                None
            },
            grad,
        };
        let last = mask.last_positions();
        let h = self
            .backbone
            .decoder
            .forward_at(&emb, &mask, &pass, &last)?;
        self.score_hidden(&h, &vec![0; last.len()], &pass)
    }

    /// Where each prompt's frozen prefix ends in a training pass: at its first ID slot, when
    /// the mode trains nothing that acts before it (step-2 modes: `collm`, `t1`, `t2`,
    /// `uitoken`, whose step-1 LoRA is frozen and draws no dropout, so the text before the
    /// first slot is the frozen LLM reading fixed text). None where prompts run whole: the mode
    /// trains the LoRA (`tallrec`, `t3`, `softprompt`), the template has no slot, a prompt
    /// starts with its slot, or [`CoLlm::frozen_prefix`] is off.
    pub fn frozen_prefix_ends(&self, enc: &[Encoded]) -> Option<Vec<usize>> {
        if !self.frozen_prefix || self.config.mode.trains_lora() {
            return None;
        }
        enc.iter()
            .map(|e| {
                let first = e.user_slots.iter().chain(&e.item_slots).min().copied()?;
                (first > 0).then_some(first)
            })
            .collect()
    }

    /// [`CoLlm::scores`] with a graph for each prompt's part from `ends[r]` on only: the parts
    /// before (rows with the same tokens there share one) run once into a prefix cache, then
    /// the rest attends to it with gradients. `slots` are in input order; scores come back in
    /// it.
    fn scores_after_frozen_prefix(
        &self,
        enc: &[Encoded],
        ends: &[usize],
        slots: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let dec = &self.backbone.decoder;
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut seen: HashMap<&[u32], usize> = HashMap::new();
        for (r, e) in enc.iter().enumerate() {
            let g = *seen.entry(&e.ids[..ends[r]]).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(r);
        }
        let order: Vec<usize> = groups.iter().flatten().copied().collect();
        let prefixes: Vec<Encoded> = groups
            .iter()
            .map(|g| enc[g[0]].split_at(ends[g[0]]).0)
            .collect();
        let (pe, pm) = self.embed_encoded(&prefixes, None)?;
        let cache = dec.prefill(&pe, &pm, &self.scoring_pass())?;
        let suffixes: Vec<Encoded> = order.iter().map(|&r| enc[r].split_at(ends[r]).1).collect();
        let identity = order.iter().enumerate().all(|(k, &r)| k == r);
        let index = |ix: &[usize]| -> Result<Tensor> {
            let ix: Vec<u32> = ix.iter().map(|&r| r as u32).collect();
            Ok(Tensor::from_vec(ix, enc.len(), &dec.device)?)
        };
        let slots = match slots {
            Some((u, i)) if !identity => {
                let o = index(&order)?;
                Some((
                    u.contiguous()?.index_select(&o, 0)?,
                    i.contiguous()?.index_select(&o, 0)?,
                ))
            }
            other => other.cloned(),
        };
        let (se, sm) = self.embed_encoded(&suffixes, slots.as_ref())?;
        let runs: Vec<(usize, usize)> = groups
            .iter()
            .enumerate()
            .map(|(p, g)| (p, g.len()))
            .collect();
        let pass = Pass {
            lora: self.lora.as_ref(),
            train: None,
            grad: true,
        };
        let h = dec.forward_cached(&se, &sm, &cache, &runs, &pass)?;
        let s = self.score_hidden(&h, &sm.last_positions(), &pass)?;
        if identity {
            return Ok(s);
        }
        let mut back = vec![0usize; order.len()];
        for (k, &r) in order.iter().enumerate() {
            back[r] = k;
        }
        Ok(s.contiguous()?.index_select(&index(&back)?, 0)?)
    }

    /// Where a prompt is split for shared-prefix scoring: at the start of its target part, or
    /// before its first user slot when the user vector depends on the item (DIN).
    pub fn split_point(&self, e: &Encoded) -> usize {
        let mut at = e.target_start;
        if self.slots.user_depends_on_item() {
            if let Some(&u) = e.user_slots.first() {
                at = at.min(u);
            }
        }
        at
    }
}
