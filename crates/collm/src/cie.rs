//! Hybrid encoding (paper §3.3, Figure 2): what fills the ID slots of a prompt.
//!
//! - [`Mapper`]: the CIE's MLP `Linear(d1, m·d1) → ReLU → Linear(m·d1, d2·k)` that lifts a
//!   collaborative model's `u` / `i` (d1) into k token embeddings of the LLM (d2);
//! - [`SlotSource`]: the CIE (a collaborative model + the mapper), or a baseline's stand-in:
//!   Soft-Prompt (k learned vectors shared by all users, and k by all items) and UI-token (a
//!   free embedding per user and per item).

use anyhow::Result;
use candle_core::{Device, Tensor};
use collm_cf::{CfBatch, CollaborativeModel};
use collm_nn::layers::Linear;
use collm_nn::{Init, ParamStore, TrainCtx};

pub struct Mapper {
    pub params: ParamStore,
    l1: Linear,
    l2: Linear,
    k: usize,
    d2: usize,
}

impl Mapper {
    pub fn new(
        d1: usize,
        mult: usize,
        d2: usize,
        k: usize,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        let mut params = ParamStore::new(dev, seed);
        let l1 = Linear::new(&mut params, "mapper.0", d1, mult * d1)?;
        let l2 = Linear::new(&mut params, "mapper.2", mult * d1, d2 * k)?;
        Ok(Self {
            params,
            l1,
            l2,
            k,
            d2,
        })
    }

    /// (B, d1) → (B, k, d2).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let h = self.l1.forward(x)?.relu()?;
        Ok(self.l2.forward(&h)?.reshape((b, self.k, self.d2))?)
    }
}

pub enum SlotSource {
    /// Text-only prompts (TALLRec, ICL).
    None,
    Cie {
        cf: Box<dyn CollaborativeModel>,
        cf_trainable: bool,
        mapper: Mapper,
    },
    /// (2, k·d2): row 0 for every user slot, row 1 for every item slot.
    SoftPrompt { params: ParamStore, table: Tensor },
    /// One free d2 vector per user and per item (k = 1).
    UiToken {
        params: ParamStore,
        users: Tensor,
        items: Tensor,
    },
}

impl SlotSource {
    pub fn soft_prompt(k: usize, d2: usize, seed: u64, dev: &Device) -> Result<Self> {
        let mut params = ParamStore::new(dev, seed);
        let table = params.param(
            "soft_prompt.weight",
            &[2, k * d2],
            Init::Normal { std: 0.02 },
        )?;
        Ok(Self::SoftPrompt { params, table })
    }

    pub fn ui_token(
        num_users: usize,
        num_items: usize,
        d2: usize,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        let mut params = ParamStore::new(dev, seed);
        let users = params.param(
            "ui_token.users",
            &[num_users, d2],
            Init::Normal { std: 0.02 },
        )?;
        let items = params.param(
            "ui_token.items",
            &[num_items, d2],
            Init::Normal { std: 0.02 },
        )?;
        Ok(Self::UiToken {
            params,
            users,
            items,
        })
    }

    /// The user and item slot embeddings for a batch, each (B, k, d2); None for text-only.
    pub fn encode(
        &self,
        batch: &CfBatch,
        k: usize,
        d2: usize,
        ctx: Option<&TrainCtx>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let b = batch.len;
        Ok(match self {
            SlotSource::None => None,
            SlotSource::Cie {
                cf,
                cf_trainable,
                mapper,
            } => {
                let out = cf.forward(batch, if *cf_trainable { ctx } else { None })?;
                let (u, i) = if *cf_trainable {
                    (out.user, out.item)
                } else {
                    // A frozen collaborative model: no gradient flows into it.
                    (out.user.detach(), out.item.detach())
                };
                Some((mapper.forward(&u)?, mapper.forward(&i)?))
            }
            SlotSource::SoftPrompt { table, .. } => {
                let u = table
                    .get(0)?
                    .reshape((1, k, d2))?
                    .broadcast_as((b, k, d2))?;
                let i = table
                    .get(1)?
                    .reshape((1, k, d2))?
                    .broadcast_as((b, k, d2))?;
                Some((u.contiguous()?, i.contiguous()?))
            }
            SlotSource::UiToken { users, items, .. } => {
                let u = users.index_select(&batch.users, 0)?.unsqueeze(1)?;
                let i = items.index_select(&batch.items, 0)?.unsqueeze(1)?;
                Some((u, i))
            }
        })
    }

    /// Whether a user slot's vector depends on the target item (CIE over DIN).
    pub fn user_depends_on_item(&self) -> bool {
        matches!(self, SlotSource::Cie { cf, .. } if cf.user_depends_on_item())
    }

    /// The parameter stores this source trains (by group name).
    pub fn stores(&self) -> Vec<(&'static str, &ParamStore)> {
        match self {
            SlotSource::None => vec![],
            SlotSource::Cie {
                cf,
                cf_trainable,
                mapper,
            } => {
                let mut v = vec![("mapper", &mapper.params)];
                if *cf_trainable {
                    v.push(("cf", cf.params()));
                }
                v
            }
            SlotSource::SoftPrompt { params, .. } => vec![("soft_prompt", params)],
            SlotSource::UiToken { params, .. } => vec![("ui_token", params)],
        }
    }
}
