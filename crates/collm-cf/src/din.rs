//! DIN (reference `RecEncoder_DIN`): three embedding tables of size e (user, target item, and a
//! separate history-item table); a local activation unit `[q, k, q−k, q⊙k] → 64 → Dice → 16 →
//! 1` gives each of the last history items an unnormalised weight (0 for padding); the head MLP
//! `[item, pooled, user] → 200 → 80 → 1` with Dice and dropout gives the logit.
//! For the CIE: u = [item, pooled, user] (3e; it already sees the target), i = [i, i, i].

use crate::nn::{dropout, Dice, Linear};
use crate::params::{Init, ParamStore};
use crate::{CfBatch, CfConfig, CfOutput, CollaborativeModel, ModelKind, TrainCtx};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

pub struct Din {
    ps: ParamStore,
    users: Tensor,
    items: Tensor,
    history_items: Tensor,
    att1: Linear,
    att_dice: Dice,
    att2: Linear,
    att3: Linear,
    head: Vec<(Linear, Dice)>,
    out: Linear,
    e: usize,
    max_len: usize,
    dropout: f64,
}

impl Din {
    pub fn new(cfg: &CfConfig, num_users: usize, num_items: usize, dev: &Device) -> Result<Self> {
        let mut ps = ParamStore::new(dev, cfg.seed);
        let e = cfg.dim;
        let users = ps.param("user_embedding.weight", &[num_users, e], Init::XavierNormal)?;
        let items = ps.param("item_embedding.weight", &[num_items, e], Init::XavierNormal)?;
        let history_items = ps.param(
            "history_embedding.weight",
            &[num_items, e],
            Init::XavierNormal,
        )?;
        let att1 = Linear::new(&mut ps, "attention.fc1", 4 * e, 64)?;
        let att_dice = Dice::new(&mut ps, "attention.dice1", 64)?;
        let att2 = Linear::new(&mut ps, "attention.fc2", 64, 16)?;
        let att3 = Linear::new(&mut ps, "attention.fc3", 16, 1)?;
        let mut head = Vec::new();
        let mut width = 3 * e;
        for (k, &h) in cfg.hidden.iter().enumerate() {
            head.push((
                Linear::new(&mut ps, &format!("mlp.{k}.fc"), width, h)?,
                Dice::new(&mut ps, &format!("mlp.{k}.dice"), h)?,
            ));
            width = h;
        }
        let out = Linear::new(&mut ps, "mlp.out", width, 1)?;
        Ok(Self {
            ps,
            users,
            items,
            history_items,
            att1,
            att_dice,
            att2,
            att3,
            head,
            out,
            e,
            max_len: cfg.max_len,
            dropout: cfg.dropout,
        })
    }
}

impl CollaborativeModel for Din {
    fn kind(&self) -> ModelKind {
        ModelKind::Din
    }
    fn dim(&self) -> usize {
        3 * self.e
    }
    fn history_len(&self) -> usize {
        self.max_len
    }
    fn forward(&self, b: &CfBatch, ctx: Option<&TrainCtx>) -> Result<CfOutput> {
        let train = ctx.is_some();
        let (bs, l) = b.history.dims2()?;
        let user = self.users.index_select(&b.users, 0)?;
        let item = self.items.index_select(&b.items, 0)?;
        let keys = self
            .history_items
            .index_select(&b.history.flatten_all()?, 0)?
            .reshape((bs, l, self.e))?;
        let q = item.unsqueeze(1)?.broadcast_as((bs, l, self.e))?;
        let att_in = Tensor::cat(&[&q, &keys, &(&q - &keys)?, &(&q * &keys)?], 2)?;
        let mut a = self.att1.forward(&att_in)?;
        a = self.att_dice.forward(&a, train)?;
        a = self.att3.forward(&self.att2.forward(&a)?)?; // (B, L, 1)
        let keep = b.history.ne(0u32)?.to_dtype(DType::F32)?.unsqueeze(2)?;
        let pooled = a.mul(&keep)?.broadcast_mul(&keys)?.sum(1)?;
        let u = Tensor::cat(&[&item, &pooled, &user], 1)?;
        let mut h = u.clone();
        for (fc, dice) in &self.head {
            h = dice.forward(&fc.forward(&h)?, train)?;
            h = dropout(&h, self.dropout, ctx)?;
        }
        let score = self.out.forward(&h)?.squeeze(D::Minus1)?;
        Ok(CfOutput {
            score,
            user: u,
            item: Tensor::cat(&[&item, &item, &item], 1)?,
        })
    }
    fn params(&self) -> &ParamStore {
        &self.ps
    }
    fn user_depends_on_item(&self) -> bool {
        true
    }
}
